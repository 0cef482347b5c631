"""A run folder without Ray (runs.py): how trials rank and are chosen (made-up trials), their
states, and which trials.json is current."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raytune_ft.runs import TrialRecord, choose, trial_state


def rec(tid: str, accs: list[float], *, ckpt: bool = True, diverged: bool = False,
        error: str | None = None) -> TrialRecord:
    hist = [{"epoch": i + 1, "val_acc": a, "val_loss": 1 - a} for i, a in enumerate(accs)]
    if diverged:
        hist.append({"epoch": len(accs) + 1, "val_acc": 0.0, "val_loss": 1e9, "diverged": True})
    return TrialRecord(tid, {"lr": 0.1}, hist, f"/ckpt/{tid}" if ckpt else None, error)


@pytest.mark.parametrize("records, expect", [
    # A one-epoch fluke does not beat trials that trained to the top rung.
    ([rec("fluke", [0.99]), rec("full", [0.5, 0.8, 0.9, 0.91]), rec("mid", [0.6, 0.95])], ["full"]),
    # Best-so-far, not last: b peaked at 0.95 then dropped.
    ([rec("a", [0.5, 0.9]), rec("b", [0.95, 0.85])], ["b", "a"]),
    # Diverged and checkpoint-less trials are never promoted.
    ([rec("d", [0.97, 0.98], diverged=True), rec("n", [0.99, 0.99], ckpt=False), rec("ok", [0.7, 0.8])], ["ok"]),
    ([rec("x", [], ckpt=False)], []),
])
def test_choose(records: list[TrialRecord], expect: list[str]) -> None:
    assert [r.trial_id for r in choose(records, "val_acc", top_k=2)] == expect


def test_choose_val_loss_is_minimised() -> None:
    records = [rec("a", [0.5, 0.9]), rec("b", [0.6, 0.7])]
    assert choose(records, "val_loss")[0].trial_id == "a"


@pytest.mark.parametrize("r, state", [
    (rec("c", [0.1, 0.2, 0.3, 0.4]), "completed"),
    (rec("s", [0.1, 0.2]), "stopped@2"),
    (rec("d", [0.1], diverged=True), "diverged"),
    (rec("f", [0.1], error="ValueError: boom"), "failed"),
    (rec("o", [], error="TrialOOMError: CUDA out of memory with batch_size 512"), "oom"),
])
def test_trial_state(r: TrialRecord, state: str) -> None:
    assert trial_state(r, max_t=4) == state


def test_results_read_a_current_trials_json_and_ignore_a_stale_one(tmp_path: Path) -> None:
    from raytune_ft.promote import TrialRecord
    from raytune_ft.runs import records_from_json

    run = tmp_path / "run"
    (run / "tune").mkdir(parents=True)
    state = run / "tune" / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text("{}")
    rec = TrialRecord("a1", {"lr": 0.1}, [{"epoch": 1, "val_acc": 0.5, "diverged": False}],
                      "/ckpt", None)
    (run / "trials.json").write_text(json.dumps([rec.__dict__]))
    os.utime(state, (1e9, 1e9))  # Ray's state older than trials.json: the run is finished
    assert records_from_json(run) == [rec]
    os.utime(run / "trials.json", (1e9 - 5, 1e9 - 5))  # a resume ran since: read Ray's state
    assert records_from_json(run) is None
