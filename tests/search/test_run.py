"""search/run.py's new study: what it is given to try first, in order, and how many of those
ASHA protects (the baseline, the warm start's, the portfolio's)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from helpers import tiny_spec

from raytune_ft import warm_start
from raytune_ft.search.run import _searcher


def test_a_new_study_tries_baseline_warm_start_then_portfolio(tmp_path: Path) -> None:
    pf = tmp_path / "pf.json"
    pf.write_text(json.dumps({"configs": [
        {"lr": 0.004, "optimizer": "adamw", "freeze_depth": 1},  # the warm start's: once
        {"lr": 0.02, "optimizer": "sgd", "momentum": 0.9, "freeze_depth": 0},
        {"lr": 0.001, "optimizer": "adamw", "freeze_depth": 0}]}))  # the baseline: once
    spec = tiny_spec(tmp_path)
    spec = spec.model_copy(update={"searcher": spec.searcher.model_copy(
        update={"portfolio": str(pf)})})
    warm = warm_start.Plan(enqueue=[{"lr": 0.004, "optimizer": "adamw", "freeze_depth": 1},
                                    {"lr": 0.001, "optimizer": "adamw", "freeze_depth": 0}])
    said: list[str] = []
    (tmp_path / "run").mkdir()
    _, first = _searcher(spec, tmp_path / "run", said.append, warm)
    study = optuna.load_study(study_name=spec.name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "run" / "optuna.journal"))))
    waiting = [t.system_attrs["fixed_params"] for t in study.trials]
    assert waiting == [{"lr": 0.001, "optimizer": "adamw", "freeze_depth": 0},
                       {"lr": 0.004, "optimizer": "adamw", "freeze_depth": 1},
                       {"lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "freeze_depth": 0}]
    # Counted in the study: the warm start's copy of the baseline was not enqueued twice.
    assert first == 3
    assert f"portfolio ({pf}): 1 configuration(s) next, each run to max_t" in said
    assert any("configs[2]: the same as the baseline" in s for s in said)
    # The study exists now: nothing is enqueued again, nothing protected.
    _, again = _searcher(spec, tmp_path / "run", said.append, warm)
    assert again == 0 and len(study.trials) == 3
