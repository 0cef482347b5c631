"""search/run.py: `run_search` end to end on a real embedded Ray with a trainer that trains
nothing (the fast loop's search); a new study: what it is given to try first, in order, and how
many of those ASHA protects (the baseline, the warm start's, the portfolio's)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from helpers import run_instant_driver, tiny_spec, write_tiny_spec

from raytune_ft import warm_start
from raytune_ft.search.run import _searcher
from raytune_ft.space import baseline_params
from raytune_ft.spec.yaml_io import load_spec


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


# A search as `rtft search` runs it, in a fresh process (Ray's workers inherit its environment,
# and with it bench/plugins/instant_trainer, whose trainer reports each epoch at once and writes
# no checkpoint): the driver's whole path through `run_search` on a real Ray, in seconds.
DRIVER = """\
import json, sys
from raytune_ft.search.run import run_search
from raytune_ft.spec.yaml_io import load_spec
def echo(line):  # not `print` itself (run_search's default): the Tuner pickles it
    print(line, flush=True)
out = run_search(load_spec(sys.argv[1], sys.argv[2:]), echo=echo)
print("OUTCOME " + json.dumps({"run_dir": str(out.run_dir), "records": len(out.records),
                               "promoted": [str(p) for p in out.promoted]}))
"""


def test_run_search_on_a_real_ray_with_the_instant_trainer(tmp_path: Path) -> None:
    epochs = 3
    spec_file = write_tiny_spec(tmp_path, n=4)
    code, out, outcome = run_instant_driver(DRIVER, [str(spec_file), f"train.max_epochs={epochs}"],
                                            cwd=tmp_path, timeout=240)
    assert code == 0, out[-4000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert Path(outcome["run_dir"]) == run_dir and outcome["records"] == 4

    # trials.json: the four trials, each epoch reported once and in order, none failed.
    trials = {t["trial_id"]: t for t in json.loads((run_dir / "trials.json").read_text())}
    assert len(trials) == 4
    for t in trials.values():
        assert t["error"] is None and t["best_checkpoint"] is None, t
        reached = [h["epoch"] for h in t["history"]]
        assert reached == list(range(1, len(reached) + 1)) and 1 <= len(reached) <= epochs

    # ASHA's decision log: every trial, up to the epoch it reached, and how it ended.
    decisions: dict[str, list[dict]] = {}
    for line in (run_dir / "asha_decisions.jsonl").read_text().splitlines():
        d = json.loads(line)
        decisions.setdefault(d["trial"], []).append(d)
    assert decisions.keys() == trials.keys()
    for tid, ds in decisions.items():
        assert max(d["epoch"] for d in ds) == len(trials[tid]["history"]), ds
        assert ds[-1]["action"] == "COMPLETE", ds
    # The baseline alone is protected, and so runs to the last epoch.
    (baseline,) = [tid for tid, ds in decisions.items() if any(d.get("protected") for d in ds)]
    assert baseline_params(load_spec(spec_file)).items() <= trials[baseline]["params"].items()
    assert len(trials[baseline]["history"]) == epochs

    # Optuna's journal: one trial per Ray trial, told by the fidelity rule.
    study = optuna.load_study(study_name="tiny", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal"))))
    assert len(study.trials) == 4
    for ft in study.trials:
        (t,) = [t for t in trials.values()
                if all(t["params"].get(k) == v for k, v in ft.params.items())]
        best = max(h["val_acc"] for h in t["history"])
        if len(t["history"]) == epochs:
            assert ft.state == optuna.trial.TrialState.COMPLETE and ft.value == best
        else:
            assert ft.state == optuna.trial.TrialState.PRUNED
            assert ft.intermediate_values == {h["epoch"]: h["val_acc"] for h in t["history"]}

    # No trial wrote a checkpoint: promotion says so, and nothing is written.
    assert outcome["promoted"] == []
    assert "nothing to promote: no trial finished an epoch with a checkpoint" in out
    assert not (tmp_path / "models").exists()
