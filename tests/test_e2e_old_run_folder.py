"""A run folder written by rtft 0.1.0 (before the search/ split) still reports, resumes and
promotes.

`tests/fixtures/runs_v0.1.0/old-run` was made by rtft at commit 10e0dde with
`tests/fixtures/runs_v0.1.0/old.yaml` (a tiny factory model, so checkpoints are a few KB),
SIGKILLed after two of its four trials had ended: Ray's pickled tuner names the old classes
(`raytune_ft.search._PersistentASHA`, `_Progress`, …) and ASHA's rungs are in the old
`asha_rungs.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "runs_v0.1.0" / "old-run"

pytestmark = pytest.mark.slow


def _rtft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The fixture's model factory must be importable by the driver and its Ray workers.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests" / "fixtures"),
                                                      str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "raytune_ft.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=400)


def test_an_old_run_folder_reports_resumes_and_promotes(tmp_path: Path) -> None:
    runs = tmp_path / "elsewhere"  # not where it was written: resume where it now is
    run = runs / "old-run"
    shutil.copytree(FIXTURE, run)
    # The folder the run was written in must not exist here, or this test could pass by
    # reading and writing there (it did, on the machine that made the fixture).
    recorded = yaml.safe_load((FIXTURE / "spec.yaml").read_text())
    old_places = [Path(recorded["run"]["storage_path"]), Path(recorded["promote"]["dir"])]
    assert not any(p.exists() for p in old_places), (
        f"{old_places} exist on this machine: the fixture's old location must be absent")
    decisions_before = (run / "asha_decisions.jsonl").read_text().splitlines()

    res = _rtft("results", str(run), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 trials:" in res.stdout and "1 completed" in res.stdout, res.stdout

    res = _rtft("resume", str(run), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming" in res.stdout and "promoted model:" in res.stdout
    trials = {t["trial_id"]: t for t in json.loads((run / "trials.json").read_text())}
    assert len(trials) == 4 and all(t["error"] is None for t in trials.values())
    # The trials that had ended before the crash were not run again ...
    done_before = {"9294ffbd", "c0368dca"}
    decisions = [json.loads(x) for x in (run / "asha_decisions.jsonl").read_text().splitlines()]
    assert decisions[:len(decisions_before)] == [json.loads(x) for x in decisions_before]
    assert all(d["trial"] not in done_before for d in decisions[len(decisions_before):])
    # ... the baseline kept its place as the protected trial, and the old rungs held: trial
    # 4d02f39d (the one running at the crash) is judged once at epoch 1, not twice.
    assert sum(1 for d in decisions if d["trial"] == "4d02f39d" and d["epoch"] == 1
               and d["action"] != "COMPLETE") == 1
    assert trials["9294ffbd"]["history"][-1]["epoch"] == 2

    assert not any(p.exists() for p in old_places), "resume wrote at the run's old location"
    # promote.dir lay beside the runs folder: the model is promoted beside where it is now
    assert (tmp_path / "models" / "old-run" / "v1" / "model.safetensors").is_file()

    res = _rtft("report", str(run), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (run / "report" / "report.html").stat().st_size > 0
