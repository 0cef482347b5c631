"""Warm starts from earlier run folders and promoted models (real files, real Optuna)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from helpers import TINY_SPEC, tiny_spec, write_tiny_spec

from raytune_ft import warm_start
from raytune_ft.cli.main import main
from raytune_ft.errors import UserError
from raytune_ft.runs import TrialRecord, write_records
from raytune_ft.spec.yaml_io import parse_spec, spec_to_yaml


def _curve(accs: list[float]) -> list[dict]:
    return [{"epoch": e, "val_acc": a, "best_val_acc": max(accs[:e]), "diverged": False}
            for e, a in enumerate(accs, 1)]


def _earlier_run(root: Path, metric_extra: str = "") -> Path:
    """An earlier search's folder as `rtft search` leaves it: spec.yaml and trials.json."""
    spec = tiny_spec(root, extra=metric_extra)
    run = root / "runs" / "earlier"
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(spec_to_yaml(spec))
    write_records(run, [
        TrialRecord("a", {"lr": 0.005, "optimizer": "adamw", "freeze_depth": 1,
                          "head_dropout": 0.2},
                    _curve([0.5, 0.9])),
        TrialRecord("b", {"lr": 0.009, "optimizer": "sgd", "momentum": 0.9, "freeze_depth": 0},
                    _curve([0.6, 0.8])),
        TrialRecord("c", {"lr": 0.002, "optimizer": "adamw", "freeze_depth": 2},
                    _curve([0.95])),  # stopped at the rung: never a warm-start choice
        TrialRecord("d", {"lr": 0.004, "optimizer": "adamw", "freeze_depth": 0},
                    _curve([0.4, 0.7]), error="RuntimeError: boom"),
    ])
    return run


def test_the_best_full_length_configurations_are_enqueued_first(tmp_path: Path) -> None:
    run = _earlier_run(tmp_path)
    # This search's space is narrower (lr up to 0.006) and does not search label smoothing's
    # neighbour `head_dropout`, which the earlier run's trial "a" had.
    spec = parse_spec(TINY_SPEC.format(root=tmp_path, n=4, weights="none"), file="tiny.yaml",
                      overrides=["search.lr={space: loguniform, low: 1.0e-3, high: 6.0e-3}"])
    spec = spec.model_copy(update={"searcher": spec.searcher.model_copy(update={
        "warm_start": [str(run)], "warm_start_top": 3})})
    plan = warm_start.plan_for(spec)
    assert plan is not None
    assert plan.enqueue == [
        {"lr": 0.005, "optimizer": "adamw", "freeze_depth": 1},
        {"lr": 0.006, "optimizer": "sgd", "momentum": 0.9, "freeze_depth": 0}]
    notes = " | ".join(plan.notes)
    assert "lr=0.009 clipped to 0.006" in notes and "head_dropout dropped" in notes
    # A study started from the plan asks for exactly those first.
    study = optuna.create_study(direction="maximize")
    for cfg in plan.enqueue:
        study.enqueue_trial(cfg)
    from raytune_ft.space import sample_params

    asked = [sample_params(spec, study.ask()) for _ in plan.enqueue]
    assert [{k: a[k] for k in cfg} for a, cfg in zip(asked, plan.enqueue, strict=True)] \
        == plan.enqueue


def test_earlier_trials_as_observations(tmp_path: Path) -> None:
    run = _earlier_run(tmp_path)
    spec = tiny_spec(tmp_path)
    plan = warm_start.plan(spec, [warm_start.read_source(run)], top=1, prior=True)
    study = optuna.create_study(direction="maximize")
    for cfg, rec, max_t in plan.observations:
        study.add_trial(warm_start.frozen_trial(spec, cfg, rec, max_t))
    states = {t.user_attrs["warm_start"]: t for t in study.trials}
    assert "a" not in states  # its head_dropout is not searched here: not the same point
    assert states["b"].state.name == "COMPLETE" and states["b"].value == 0.8
    assert states["b"].intermediate_values == {1: 0.6, 2: 0.8}
    assert states["c"].state.name == "PRUNED" and states["c"].intermediate_values == {1: 0.95}
    assert states["d"].state.name == "FAIL"


def test_conditions_and_fixed_values_of_this_search_are_respected(tmp_path: Path) -> None:
    # Here momentum applies to adam only and freeze_depth is fixed to 1: an earlier adamw trial
    # with momentum and freeze_depth 0 keeps its lr and optimizer only.
    spec = parse_spec(TINY_SPEC.format(root=tmp_path, n=4, weights="none"), file="tiny.yaml",
                      overrides=["search.optimizer={space: choice, values: [adam, adamw]}",
                                 "search.momentum={space: uniform, low: 0.8, high: 0.95, "
                                 "when: {optimizer: adam}}", "search.freeze_depth=1"])
    cfg, changed = warm_start.fit_to_space(
        spec, {"lr": 0.009, "optimizer": "adamw", "momentum": 0.9, "freeze_depth": 0})
    assert cfg == {"lr": 0.009, "optimizer": "adamw"}
    assert any("freeze_depth=0 differs" in c for c in changed)
    assert any("momentum dropped (inactive here)" in c for c in changed)


def test_a_promoted_model_is_a_source(tmp_path: Path) -> None:
    model = tmp_path / "models" / "earlier" / "v1"
    model.mkdir(parents=True)
    (model / "spec.yaml").write_text(spec_to_yaml(tiny_spec(tmp_path)))
    (model / "metrics.json").write_text(json.dumps({
        "trial_id": "a", "epochs": 2, "metric": "val_acc", "params": {"lr": 0.005},
        "val": {"best_val_acc": 0.9}}))
    plan = warm_start.plan(tiny_spec(tmp_path), [warm_start.read_source(model)], top=3,
                           prior=False)
    assert plan.enqueue == [{"lr": 0.005}]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is not an rtft run or model folder"),
    ("running", "has no trials.json"),
    ("metric", "optimised val_loss, this search optimises val_acc"),
    ("disjoint", "nothing in common"),
])
def test_bad_sources_are_refused(tmp_path: Path, case: str, message: str) -> None:
    if case == "metric":
        src = _earlier_run(tmp_path, "metric: val_loss\n")
    elif case == "disjoint":
        src = _earlier_run(tmp_path)
        write_records(src, [TrialRecord("z", {"label_smoothing": 0.1}, _curve([0.5, 0.6]))])
    else:
        src = tmp_path / "src"
        if case != "missing":
            src.mkdir()
        if case == "running":
            (src / "spec.yaml").write_text(spec_to_yaml(tiny_spec(tmp_path)))
    spec = tiny_spec(tmp_path)
    spec = spec.model_copy(update={"searcher": spec.searcher.model_copy(update={
        "warm_start": [str(src)]})})
    with pytest.raises(UserError, match=message) as e:
        warm_start.plan_for(spec)
    assert e.value.field == "searcher.warm_start"


def test_search_refuses_a_bad_source_before_writing_anything(tmp_path: Path) -> None:
    spec_file = write_tiny_spec(tmp_path, extra="")
    text = spec_file.read_text().replace(
        "searcher: {", f"searcher: {{warm_start: [{tmp_path / 'nope'}], ")
    spec_file.write_text(text)
    for command in ("validate", "search"):
        res = CliRunner().invoke(main, [command, str(spec_file)])
        assert res.exit_code == 2, res.output
        assert "searcher.warm_start" in res.output and "does not exist" in res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


# -- the architecture: a choice search starts from single-arch runs, and the other way -------
ARCH_CHOICE = "model.arch={space: choice, values: [mobilenet_v3_small, resnet18]}"


def test_a_single_arch_run_warm_starts_a_choice_of_archs(tmp_path: Path) -> None:
    run = _earlier_run(tmp_path)  # resnet18 in every trial
    spec = parse_spec(TINY_SPEC.format(root=tmp_path, n=4, weights="none"), file="tiny.yaml",
                      overrides=[ARCH_CHOICE])
    plan = warm_start.plan(spec, [warm_start.read_source(run)], top=1, prior=True)
    assert plan.enqueue == [{"arch": "resnet18", "lr": 0.005, "optimizer": "adamw",
                             "freeze_depth": 1}]
    study = optuna.create_study(direction="maximize")
    for cfg, rec, max_t in plan.observations:
        study.add_trial(warm_start.frozen_trial(spec, cfg, rec, max_t))
    b = next(t for t in study.trials if t.user_attrs["warm_start"] == "b")
    assert b.params["arch"] == "resnet18"
    assert b.distributions["arch"] == optuna.distributions.CategoricalDistribution(
        ["mobilenet_v3_small", "resnet18"])


def test_a_trial_of_another_arch_is_noted_and_never_an_observation(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)  # resnet18 only
    cfg, changed = warm_start.fit_to_space(spec, {"arch": "mobilenet_v3_small", "lr": 0.005})
    assert cfg == {"lr": 0.005}
    assert changed == ["arch='mobilenet_v3_small' differs from this search's 'resnet18'"]
    assert warm_start.fit_to_space(spec, {"arch": "resnet18", "lr": 0.005}) == ({"lr": 0.005},
                                                                                [])
    choice = parse_spec(TINY_SPEC.format(root=tmp_path, n=4, weights="none"), file="tiny.yaml",
                        overrides=[ARCH_CHOICE.replace("mobilenet_v3_small", "alexnet")])
    cfg, changed = warm_start.fit_to_space(choice, {"arch": "mobilenet_v3_small", "lr": 0.005})
    assert cfg == {"lr": 0.005} and changed == [
        "arch='mobilenet_v3_small' dropped (not among ['alexnet', 'resnet18'])"]


def test_same_data_compares_each_input_size_an_arch_choice_recorded() -> None:
    from raytune_ft.warm_start import _same_data

    small, big = {"source": "digits", "sha256": "aa"}, {"source": "digits", "sha256": "bb"}
    choice = {**small, "by_image_size": {"32": small, "224": big}}
    assert _same_data(choice, big) and _same_data(small, choice) and _same_data(choice, choice)
    assert not _same_data(choice, {"source": "digits", "sha256": "cc"})
    assert not _same_data(small, big)
