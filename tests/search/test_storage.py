"""Where a run's files go (search/storage.py): run.storage_path on S3, a real search against a
local S3-compatible server (moto_server), configured the way a MinIO user configures it
(AWS_ENDPOINT_URL and keys in the environment). (The shared-storage probe: test_cluster.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, free_port, write_tiny_spec

BUCKET = "rtft-test"


@pytest.fixture
def s3_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with one bucket; the environment a client needs."""
    boto3 = pytest.importorskip("boto3")
    if shutil.which("moto_server") is None:
        pytest.skip("moto_server not installed (pip install -e '.[test]')")
    port = free_port()
    with open(tmp_path / "moto.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                              aws_access_key_id="testing", aws_secret_access_key="testing",
                              region_name="us-east-1")
        deadline = time.monotonic() + 30
        while True:  # until the server answers (it takes a second or two to start)
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_search_on_s3_lands_in_the_bucket(tmp_path: Path, s3_env: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's experiment and rtft's own run files end up in the bucket; the promoted model is
    written locally (promote.dir stays a path) from a checkpoint downloaded from S3, and
    `rtft promote` on the staging folder promotes again from the bucket."""
    import boto3
    from click.testing import CliRunner

    from raytune_ft.cli.main import main

    spec = write_tiny_spec(tmp_path, n=2)
    env = {**os.environ, **s3_env, "PYTHONPATH": str(ROOT), "RTFT_CACHE": str(tmp_path / "cache"),
           "RAY_AIR_NEW_OUTPUT": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "raytune_ft.cli", "search", str(spec), "--quiet",
         "--set", f"run.storage_path=s3://{BUCKET}/runs", "--set", "train.max_epochs=1",
         "--set", "scheduler.type=none"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"results: s3://{BUCKET}/runs/tiny" in proc.stdout

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"],
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]}
    for name in ("spec.yaml", "data.json", "trials.json", "optuna.journal"):
        assert f"runs/tiny/{name}" in keys, sorted(keys)
    trials = {k.split("/")[3] for k in keys if k.startswith("runs/tiny/tune/trial_")}
    assert len(trials) == 2, sorted(keys)
    for t in trials:  # each trial's checkpoint and TensorBoard file went to S3 from its worker
        assert any(k.startswith(f"runs/tiny/tune/{t}/checkpoint_") and k.endswith("state.pt")
                   for k in keys), sorted(keys)
        assert any(k.startswith(f"runs/tiny/tune/{t}/events.out.tfevents") for k in keys)
    assert any(k.startswith("runs/tiny/tune/experiment_state-") for k in keys)
    # The uploaded trials.json is the final one: both trials, with S3 checkpoint URIs.
    body = client.get_object(Bucket=BUCKET, Key="runs/tiny/trials.json")["Body"].read()
    assert body.count(b'"best_checkpoint": "s3://') == 2

    promoted = tmp_path / "models" / "tiny" / "v1"
    assert (promoted / "model.safetensors").exists() and (promoted / "metrics.json").exists()
    # Nothing was written to a local folder named after the URI ("s3:/rtft-test/...").
    assert not (tmp_path / "s3:").exists()

    staging = re.search(r"rtft's files staged in (\S+)\)", proc.stdout).group(1)
    for k, v in {**s3_env, "RTFT_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(main, ["promote", staging])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "models" / "tiny" / "v2" / "model.safetensors").exists()
