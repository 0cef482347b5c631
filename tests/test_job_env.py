"""What a job carries (job_env.py): headers, env vars, and secrets redacted when shown."""

from __future__ import annotations

import json

import pytest
from helpers import SECRET

from raytune_ft import jobs
from raytune_ft.job_env import redact


def test_redact_hides_secret_values_keeps_names() -> None:
    env = {"env_vars": {"HF_TOKEN": "hf_abc", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "x",
                        "RAY_AUTH_TOKEN": "t", "WANDB_API_KEY": "k", "DB_PASSWORD": "p",
                        "PATH": "/usr/bin", "OMP_NUM_THREADS": "1"},
           "pip": ["raytune-ft"], "jobs": [{"my_secret": "s", "name": "n"}]}
    out = redact(env)
    assert out["env_vars"] == {"HF_TOKEN": "***", "AWS_SECRET_ACCESS_KEY": "***",
                               "AWS_REGION": "***", "RAY_AUTH_TOKEN": "***",
                               "WANDB_API_KEY": "***", "DB_PASSWORD": "***",
                               "PATH": "/usr/bin", "OMP_NUM_THREADS": "1"}
    assert out["pip"] == ["raytune-ft"] and out["jobs"] == [{"my_secret": "***", "name": "n"}]
    assert env["env_vars"]["HF_TOKEN"] == "hf_abc"  # a copy: the original is untouched
    assert "hf_abc" not in json.dumps(out)


def test_headers_from_env_json_lines_and_flags_later_wins() -> None:
    env = {"RAY_JOB_HEADERS": json.dumps({"X-A": "1", "Authorization": "Bearer old"}),
           "RTFT_JOB_HEADERS": "X-B: 2\nAuthorization: Bearer env"}
    got = jobs.parse_headers([f"Authorization: Bearer {SECRET}", "X-C:3"], env=env)
    assert got == {"X-A": "1", "X-B": "2", "X-C": "3", "Authorization": f"Bearer {SECRET}"}
    assert SECRET not in jobs.describe_headers(got)


@pytest.mark.parametrize("bad", [SECRET, ": no name", "two words: x"])
def test_bad_header_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(jobs.JobsError) as e:
        jobs.parse_headers([bad], env={})
    assert SECRET not in str(e.value) and "Name: value" in str(e.value)


def test_bad_header_env_is_refused() -> None:
    with pytest.raises(jobs.JobsError, match="RTFT_JOB_HEADERS"):
        jobs.parse_headers([], env={"RTFT_JOB_HEADERS": "{not json"})


def test_env_vars_copied_or_given() -> None:
    got = jobs.parse_env(["AWS_ENDPOINT_URL", "A=1=2"], env={"AWS_ENDPOINT_URL": "http://x"})
    assert got == {"AWS_ENDPOINT_URL": "http://x", "A": "1=2"}
    with pytest.raises(jobs.JobsError, match="not set"):
        jobs.parse_env(["MISSING"], env={})
    with pytest.raises(jobs.JobsError):
        jobs.parse_env(["no-dashes=1"], env={})
