"""The telling rule (raytune_ft.fidelity.tell), case by case."""

from __future__ import annotations

import pytest

from raytune_ft.fidelity import Told, tell


def _r(epoch: int, acc: float, best: float, diverged: bool = False) -> dict:
    return {"training_iteration": epoch, "val_acc": acc, "best_val_acc": best,
            "diverged": diverged}


@pytest.mark.parametrize("result, error, expect", [
    (_r(4, 0.80, 0.90), False, Told("COMPLETE", 0.90)),   # full length: best-so-far, not last
    (_r(1, 0.95, 0.95), False, Told("PRUNED")),           # stopped at a rung, however good
    (_r(2, 0.0, 0.7, diverged=True), False, Told("PRUNED")),
    (_r(4, 0.0, 0.7, diverged=True), False, Told("PRUNED")),  # diverged at the last epoch
    (_r(3, 0.5, 0.5), True, Told("FAIL")),
    (None, False, Told("FAIL")),                           # ended before any result
    ({"training_iteration": 4, "val_acc": float("nan")}, False, Told("PRUNED")),
])
def test_fidelity_rule(result: dict | None, error: bool, expect: Told) -> None:
    assert tell(result, error=error, metric="val_acc", max_t=4) == expect


def test_the_last_rule_is_rays() -> None:
    assert tell(_r(1, 0.3, 0.9), error=False, metric="val_acc", max_t=4,
                telling="last") == Told("COMPLETE", 0.3)


def test_a_minimised_metric_uses_its_own_best() -> None:
    r = {"training_iteration": 4, "val_loss": 0.5, "best_val_loss": 0.2}
    assert tell(r, error=False, metric="val_loss", max_t=4) == Told("COMPLETE", 0.2)
