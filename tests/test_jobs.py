"""rtft submit / rtft jobs without a cluster: headers, env vars, what a job ships, what it
refuses, and `rtft validate`'s fit line. (The real Jobs API runs in test_cluster.py.)"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_tiny_spec

from raytune_ft import job_entry, jobs
from raytune_ft.cli import main
from raytune_ft.errors import SpecError

SECRET = "s3cr3t-t0ken-value"


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


def _spec(tmp_path: Path, extra: str = "") -> Path:
    return write_tiny_spec(tmp_path, extra=extra)


def test_prepare_ships_the_spec_and_relative_files_only(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.pth").write_bytes(b"weights")
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "dataset.bin").write_bytes(b"x" * 1000)  # not named: not shipped
    spec = _spec(tmp_path)
    sub = jobs.prepare(spec.name, ["model.weights=sub/w.pth", "run.num_samples=3"],
                       env_vars={"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "x"})
    try:
        staged = sorted(str(p.relative_to(sub.staging)) for p in sub.staging.rglob("*"))
        assert staged == ["sub", "sub/w.pth", "tiny.yaml"]
        assert (sub.staging / "sub" / "w.pth").read_bytes() == b"weights"
        assert sub.runtime_env["working_dir"] == str(sub.staging)
        assert Path(sub.runtime_env["py_modules"][0]).name == "raytune_ft"
        argv = shlex.split(sub.entrypoint)
        assert argv[:5] == ["python", "-m", "raytune_ft.job_entry", "search", "tiny.yaml"]
        assert argv[5:] == ["--set", "model.weights=sub/w.pth", "--set", "run.num_samples=3"]
        assert sub.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET  # sent…
        assert SECRET not in json.dumps(sub.printable_env())                  # …never shown
    finally:
        jobs.shutil.rmtree(sub.staging)


def test_prepare_leaves_absolute_paths_to_the_cluster(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "abs.pth"
    weights.write_bytes(b"w")
    monkeypatch.chdir(tmp_path)
    sub = jobs.prepare(_spec(tmp_path).name, [f"model.weights={weights}"], ship_code=False)
    try:
        assert sub.assumed == [str(weights)]
        assert not (sub.staging / "abs.pth").exists()
        assert "py_modules" not in sub.runtime_env
    finally:
        jobs.shutil.rmtree(sub.staging)


@pytest.mark.parametrize("override, field", [
    ("run.storage_path=./rtft_runs", "run.storage_path"),
    ("promote.dir=models", "promote.dir"),
])
def test_prepare_refuses_relative_result_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 override: str, field: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as e:
        jobs.prepare(_spec(tmp_path).name, [override])
    assert e.value.field == field and "temporary working folder" in str(e.value)


def test_prepare_refuses_relative_file_outside_the_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "w.pth").write_bytes(b"w")
    (tmp_path / "inner").mkdir()
    spec = _spec(tmp_path)
    monkeypatch.chdir(tmp_path / "inner")
    with pytest.raises(SpecError) as e:
        jobs.prepare(spec, ["model.weights=../w.pth"])
    assert e.value.field == "model.weights"


def test_submit_cli_bad_input_exits_2_before_contacting_anything(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    r = CliRunner().invoke(main, ["submit", str(spec), "--address", "http://127.0.0.1:9",
                                  "--set", "run.storage_path=rel"])
    assert r.exit_code == 2 and "run.storage_path" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["submit", str(spec), "--address", "http://127.0.0.1:9",
                                  "--header", SECRET])
    assert r.exit_code == 2 and SECRET not in r.output


def test_jobs_error_is_a_user_error_that_no_spec_file_locates() -> None:
    from raytune_ft.errors import UserError

    e = jobs.JobsError("cannot reach the Ray Jobs API at http://x:8265: refused")
    assert isinstance(e, UserError) and isinstance(e, RuntimeError)
    assert str(e.located("tiny.yaml")) == "cannot reach the Ray Jobs API at http://x:8265: refused"
    assert e.file is None and e.line is None


def test_jobs_errors_keep_their_cause_for_debug() -> None:
    with pytest.raises(jobs.JobsError) as e:
        jobs.parse_headers([], env={"RTFT_JOB_HEADERS": "{not json"})
    assert isinstance(e.value.__cause__, json.JSONDecodeError)
    with pytest.raises(jobs.JobsError, match="^cannot reach the Ray Jobs API") as e:
        jobs.client("http://127.0.0.1:9")
    assert e.value.__cause__ is not None and "\n" not in str(e.value)


def test_jobs_cli_unreachable_address_is_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["jobs", "list", "--address", "http://127.0.0.1:9"])
    assert r.exit_code == 2
    assert r.output.startswith("error: cannot reach the Ray Jobs API at http://127.0.0.1:9")
    assert "Traceback" not in r.output


def test_job_entry_runs_rtft_in_a_private_copy(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The entrypoint copies the working dir and runs there: Ray may re-extract the original
    under the running driver (see job_entry.main)."""
    (tmp_path / "x.txt").write_text("here")
    monkeypatch.chdir(tmp_path)
    seen: dict[str, str] = {}

    def fake_main(args: list[str], prog_name: str, standalone_mode: bool) -> None:
        seen["cwd"] = os.getcwd()
        seen["x"] = Path("x.txt").read_text()
        seen["args"] = " ".join(args)
        raise SystemExit(3)

    monkeypatch.setattr("raytune_ft.cli.main", fake_main)
    assert job_entry.main(["search", "tiny.yaml"]) == 3
    assert seen["cwd"] != str(tmp_path) and seen["x"] == "here"
    assert seen["args"] == "search tiny.yaml"
    assert Path.cwd() == tmp_path and not Path(seen["cwd"]).exists()  # cleaned up


def test_search_with_http_address_explains_itself() -> None:
    from raytune_ft.search.cluster import ensure_ray

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        pytest.skip("a Ray is already running in this process")
    with pytest.raises(SpecError, match="rtft submit SPEC --address http://head:8265"):
        ensure_ray("http://head:8265", print)


@pytest.mark.parametrize("args, expect", [
    (["--set", "run.resources.gpu=0.5", "--cluster-gpus", "4"], "8 trial(s) fit at once on a cluster of 4 GPU"),
    (["--cluster-gpus", "4", "--cluster-cpus", "3"], "3 trial(s) fit at once"),
])
def test_validate_prints_how_many_trials_fit(tmp_path: Path, args: list[str], expect: str) -> None:
    r = CliRunner().invoke(main, ["validate", str(_spec(tmp_path)), *args])
    assert r.exit_code == 0, r.output
    assert expect in r.output and "2 run at a time" in r.output


def test_validate_refuses_a_cluster_too_small(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["validate", str(_spec(tmp_path)), "--set",
                                  "run.resources.gpu=2", "--cluster-gpus", "1"])
    assert r.exit_code == 2 and "run.resources" in r.output and "pending forever" in r.output
