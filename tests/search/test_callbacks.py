"""Tune callbacks (search/callbacks.py): live progress, a table redrawn in place on a terminal,
plain lines elsewhere (made-up trials)."""

from __future__ import annotations

import pytest
from helpers import ROOT

from raytune_ft.search.callbacks import Progress
from raytune_ft.spec_io import load_spec

SPEC = load_spec(ROOT / "search_spaces" / "resnet.yaml")


class _Trial:
    def __init__(self, tid: str, epoch: int = 1) -> None:
        self.trial_id, self.status = tid, "RUNNING"
        self.config = {"lr": 0.01, "optimizer": "sgd"}
        self.last_result = {"epoch": epoch, "best_val_acc": 0.5}


def _drive(p: Progress) -> None:
    a, b = _Trial("a"), _Trial("b", epoch=4)
    p.on_trial_start(0, [], a)
    p.on_trial_start(0, [], b)
    p.on_trial_result(0, [a, b], a, {"epoch": 1, "val_acc": 0.5, "best_val_acc": 0.5})
    p.on_trial_complete(0, [a, b], a)
    p.on_trial_complete(0, [b], b)
    p.on_experiment_end([a, b])


@pytest.mark.parametrize("live, quiet", [(True, False), (False, False), (False, True)])
def test_progress_modes(capsys: pytest.CaptureFixture, live: bool, quiet: bool) -> None:
    _drive(Progress(SPEC, print, quiet, live=live))
    out = capsys.readouterr().out
    assert "a stopped by ASHA after epoch 1" in out and "b completed after epoch 4" in out
    assert ("\x1b[" in out) == live  # redrawn in place only on a terminal
    assert ("a start" in out) == (not live and not quiet)
    assert ("1/4" in out) == (not quiet)
    if live:
        assert out.endswith("\x1b[J")  # the table is cleared at the end
