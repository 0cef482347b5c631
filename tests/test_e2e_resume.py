"""Operating a search end to end (cli → search/run.py → trainable): SIGKILL of the driver then
--resume, failures (a trial whose checkpoint is truncated fails alone), the run lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ENV, ROOT, write_tiny_spec

from raytune_ft.cli.main import main
from raytune_ft.search.schedulers import PersistentASHA

pytestmark = pytest.mark.slow

SETS = ["--set", "train.max_epochs=4", "--set", "run.num_samples=6",
        "--set", "searcher.sampler=random"]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _search_killed_after(spec_file: Path, sets: list[str], n_ended: int = 2) -> list[str]:
    """Run `rtft search` in a subprocess and SIGKILL it (and the Ray it started) once
    `n_ended` trials have ended; returns the ids of the trials that had ended."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "raytune_ft.cli", "search", str(spec_file),
                             *sets], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    ended: list[str] = []
    try:
        # Synchronise on the driver's own progress lines: once two trials have ended, kill at
        # the next epoch line (a later controller step, after Ray's state snapshot).
        for line in proc.stdout:
            if " after epoch " in line:
                ended.append(line.split("] ", 1)[1].split()[0])
            elif len(ended) >= n_ended and " epoch " in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, no goodbye
        proc.wait()
    assert len(ended) >= n_ended, "the search ended before two trials finished"
    return ended


def test_sigkill_mid_search_then_resume(ray_session, tmp_path: Path, backbone_file: Path) -> None:  # noqa: ANN001
    spec_file = write_tiny_spec(tmp_path, weights=str(backbone_file))
    run_dir = tmp_path / "runs" / "tiny"
    ended = _search_killed_after(spec_file, SETS)
    before = {d.name.removeprefix("trial_"): _lines(d / "result.json")
              for d in (run_dir / "tune").glob("trial_*")}
    decisions_before = _lines(run_dir / "asha_decisions.jsonl")
    assert set(ended) <= set(before)

    res = CliRunner().invoke(main, ["search", str(spec_file), *SETS, "--resume"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and "promoted model:" in res.output

    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials) == 6  # (b) the search still ends with num_samples trials
    decisions = [json.loads(x) for x in (run_dir / "asha_decisions.jsonl").read_text().splitlines()]
    assert len(decisions) > decisions_before
    for tid in ended:  # (a) no completed trial is re-run: no new results, no new decisions
        assert _lines(run_dir / "tune" / f"trial_{tid}" / "result.json") == before[tid]
        assert all(d["trial"] != tid for d in decisions[decisions_before:])
    # (c) rungs survived the crash: no trial is judged twice at a rung, so none is stopped at a
    # rung it had already passed before the crash.
    milestones = {1, 2}
    passed: set[tuple[str, int]] = set()
    for d in decisions:
        key = (d["trial"], d["epoch"])
        if d["epoch"] in milestones:
            assert not (d["action"] == "STOP" and key in passed), d
            if d["action"] == "CONTINUE":
                passed.add(key)
    # Every trial recorded at the first rung exactly once (the rungs as a resumed scheduler
    # rebuilds them from the run folder).
    rebuilt = PersistentASHA(run_dir, time_attr="training_iteration", metric="val_acc",
                             mode="max", max_t=4, grace_period=1, reduction_factor=2)
    assert len(rebuilt.rungs()[1.0]) == 6
    # The first trial is the enqueued default fine-tune, never stopped early.
    first = next((d["trial"] for d in decisions if d.get("protected")), None)
    assert first and all(not (d["trial"] == first and d["action"] == "STOP"
                              and d["epoch"] < 4) for d in decisions)


def test_sigkill_then_move_the_folder_then_resume_where_it_is(ray_session, tmp_path: Path,  # noqa: ANN001
                                                              backbone_file: Path) -> None:
    """A run folder moved after a crash (copied off a cluster, a renamed project) resumes
    where it now is: every trial kept, none re-run, the ASHA log and the Optuna journal go on
    in the new place, and nothing is written at the old one."""
    spec_file = write_tiny_spec(tmp_path, weights=str(backbone_file))
    ended = _search_killed_after(spec_file, SETS)
    old = tmp_path / "runs"
    new = tmp_path / "moved" / "project" / "runs" / "tiny"
    new.parent.mkdir(parents=True)
    (old / "tiny").rename(new)
    old.rmdir()  # the old location is gone: anything written there would recreate it
    before = {d.name.removeprefix("trial_"): _lines(d / "result.json")
              for d in (new / "tune").glob("trial_*")}
    decisions_before = _lines(new / "asha_decisions.jsonl")
    journal_before = _lines(new / "optuna.journal")

    res = CliRunner().invoke(main, ["resume", str(new)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and "promoted model:" in res.output
    assert not old.exists() and not (tmp_path / "models").exists(), "written at the old place"
    trials = json.loads((new / "trials.json").read_text())
    assert len(trials) == 6 and not any(t["error"] for t in trials)
    # Every checkpoint is in the folder where the run is now (trials stopped by ASHA before
    # their last epoch keep none: run.checkpoint_every is 0).
    kept = [t["best_checkpoint"] for t in trials if t["best_checkpoint"]]
    assert len(kept) >= sum(len(t["history"]) == 4 for t in trials) >= 1
    assert all(c.startswith(str(new.resolve() / "tune")) for c in kept), kept
    for tid in ended:  # finished before the crash: no new result, no new ASHA decision
        assert _lines(new / "tune" / f"trial_{tid}" / "result.json") == before[tid]
    decisions = [json.loads(x) for x in (new / "asha_decisions.jsonl").read_text().splitlines()]
    assert len(decisions) > decisions_before
    assert not {d["trial"] for d in decisions[decisions_before:]} & set(ended)
    assert _lines(new / "optuna.journal") > journal_before  # the study went on here
    # promote.dir sat beside the runs folder in the spec: it moved with it
    assert (tmp_path / "moved" / "project" / "models" / "tiny" / "v1").is_dir()


def test_second_search_on_the_same_run_is_refused(tmp_path: Path) -> None:
    import fcntl

    spec_file = write_tiny_spec(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".rtft.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("pid 12345")
        f.flush()
        res = CliRunner().invoke(main, ["search", str(spec_file)])
    assert res.exit_code == 2
    assert "in use by another rtft search (pid 12345)" in res.output


def test_failing_and_diverging_trials_never_kill_the_search(ray_session, tmp_path: Path,  # noqa: ANN001
                                                            backbone_file: Path) -> None:
    spec_file = write_tiny_spec(tmp_path, weights=str(backbone_file))
    sets = ["--set", "search.optimizer=sgd", "--set", "search.momentum=0.99",
            "--set", "search.freeze_depth=0", "--set", "search.backbone_lr_mult=10",
            "--set", "search.lr={space: choice, values: [0.003, 10.0]}",
            "--set", "search.warmup_epochs={space: choice, values: [0.0, 5.0]}",
            "--set", "searcher.sampler=random", "--set", "searcher.seed=4",
            "--set", "run.num_samples=6", "--set", "scheduler.type=none",
            "--set", "searcher.baseline_first=false"]
    res = CliRunner().invoke(main, ["search", str(spec_file), *sets], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "FAILED" in res.output and "DIVERGED" in res.output
    trials = json.loads((tmp_path / "runs" / "tiny" / "trials.json").read_text())
    failed = [t for t in trials if t["error"]]
    assert failed and all("warmup_epochs (5.0) must be below" in t["error"] for t in failed)
    assert all(t["params"]["warmup_epochs"] == 5.0 for t in failed)
    diverged = [t for t in trials if any(h.get("diverged") for h in t["history"])]
    assert diverged and all(t["params"]["lr"] == 10.0 for t in diverged)
    metrics = json.loads(next((tmp_path / "models" / "tiny").glob("v1/metrics.json")).read_text())
    assert metrics["params"]["lr"] == 0.003 and metrics["params"]["warmup_epochs"] == 0.0
    res = CliRunner().invoke(main, ["results", str(tmp_path / "runs" / "tiny")])
    assert "failed" in res.output and "diverged" in res.output


def test_too_many_failed_trials_end_the_search(ray_session, tmp_path: Path) -> None:  # noqa: ANN001
    spec_file = write_tiny_spec(tmp_path)
    sets = ["--set", "search.warmup_epochs=5.0", "--set", "run.num_samples=8",
            "--set", "run.max_failed_trials=2", "--set", "run.max_concurrent_trials=1"]
    res = CliRunner().invoke(main, ["search", str(spec_file), *sets], catch_exceptions=False)
    assert res.exit_code == 1, res.output  # no model came out of it
    assert "2 trials failed (run.max_failed_trials = 2): ending the search" in res.output
    assert "nothing to promote" in res.output
    trials = json.loads((tmp_path / "runs" / "tiny" / "trials.json").read_text())
    assert sum(1 for t in trials if t["error"]) == 2
    assert len([t for t in trials if t["history"] or t["error"]]) == 2  # no third trial ran



# Nothing lost: a trial whose checkpoint is truncated fails cleanly; the search goes on.
@pytest.mark.slow
def test_truncated_trial_checkpoint_fails_that_trial_only(tmp_path: Path) -> None:
    # The search runs in its own process, with tests/plugins/faults on PYTHONPATH: its
    # sitecustomize wraps the trainable's report seam (nothing of this is in raytune_ft), and
    # the Ray workers of the Ray that process starts inherit the environment.
    spec_file = write_tiny_spec(tmp_path, n=2)
    faults = tmp_path / "faults"
    faults.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "raytune_ft.cli", "search", str(spec_file), "--quiet",
         "--set", "run.max_failures=1", "--set", "scheduler.type=none",
         "--set", "search.freeze_depth=0",
         "--set", "run.checkpoint_every=1"],  # the retry must find epoch 1's checkpoint
        capture_output=True, text=True, env={**ENV, "RTFT_TEST_FAULTS": str(faults),
                                               "PYTHONPATH": os.pathsep.join(
                                                   [str(ROOT / "tests" / "plugins" / "faults"),
                                                    ENV["PYTHONPATH"]])},
        cwd=ROOT, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "promoted model:" in proc.stdout
    victim = (faults / "victim").read_text()
    trials = {t["trial_id"]: t for t in
              json.loads((tmp_path / "runs" / "tiny" / "trials.json").read_text())}
    assert len(trials) == 2 and victim in trials
    error = trials[victim]["error"] or ""
    # Not the injected crash: the retry resumed from the truncated checkpoint and said so.
    assert "CheckpointError" in error and "cannot be read" in error, error
    others = [t for tid, t in trials.items() if tid != victim]
    assert all(t["error"] is None and max(h["epoch"] for h in t["history"]) == 2
               for t in others), others
