"""ASHA decisions with made-up trials: rungs persist across a restart, the baseline is exempt."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from raytune_ft.search import _PersistentASHA


class _T:
    def __init__(self, tid: str) -> None:
        self.trial_id = tid


def _asha(run_dir: Path, protect_first: bool = False) -> _PersistentASHA:
    return _PersistentASHA(run_dir, protect_first=protect_first, time_attr="training_iteration",
                           max_t=4, metric="val_acc", mode="max", grace_period=1,
                           reduction_factor=2)


def _result(epoch: int, acc: float) -> dict:
    return {"training_iteration": epoch, "val_acc": acc}


def test_rungs_survive_a_restart_from_the_pickled_scheduler(tmp_path: Path) -> None:
    fresh = pickle.dumps(_asha(tmp_path))  # what Tuner.restore brings back: empty rungs
    first = pickle.loads(fresh)
    first.on_trial_add(None, _T("a"))
    assert first.on_trial_result(None, _T("a"), _result(1, 0.9)) == "CONTINUE"
    again = pickle.loads(fresh)  # the driver died; a new one restores the scheduler
    again.on_trial_add(None, _T("b"))
    # Judged against a's record from before the crash, b is stopped at the first rung ...
    assert again.on_trial_result(None, _T("b"), _result(1, 0.5)) == "STOP"
    # ... and a, re-reporting epoch 1 from its checkpoint, is not judged twice.
    assert again.on_trial_result(None, _T("a"), _result(1, 0.1)) == "CONTINUE"
    decisions = (tmp_path / "asha_decisions.jsonl").read_text().splitlines()
    assert [json.loads(d)["action"] for d in decisions] == ["CONTINUE", "STOP", "CONTINUE"]


def test_the_first_trial_is_never_stopped_early(tmp_path: Path) -> None:
    asha = _asha(tmp_path, protect_first=True)
    for tid in ("baseline", "a", "b"):
        asha.on_trial_add(None, _T(tid))
    assert asha.on_trial_result(None, _T("a"), _result(1, 0.9)) == "CONTINUE"
    assert asha.on_trial_result(None, _T("b"), _result(1, 0.8)) == "STOP"
    assert asha.on_trial_result(None, _T("baseline"), _result(1, 0.1)) == "CONTINUE"
    assert asha.on_trial_result(None, _T("baseline"), _result(4, 0.1)) == "STOP"  # max_t
