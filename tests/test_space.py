"""The search space in Optuna (no Ray): conditional sampling, fixed values, samplers, rungs."""

from __future__ import annotations

import optuna
import pytest

from raytune_ft.knobs import SPACES
from raytune_ft.space import (
    SUGGEST,
    baseline_params,
    define_by_run,
    hparams_for,
    make_sampler,
    rung_plan,
    sample_params,
)
from raytune_ft.spec.yaml_io import parse_spec

SPEC = """\
name: s
search:
  lr: {space: loguniform, low: 1.0e-4, high: 1.0e-1}
  optimizer: {space: choice, values: [sgd, adamw]}
  momentum: {space: uniform, low: 0.8, high: 0.99, when: {optimizer: sgd}}
  freeze_depth: {space: int, low: 0, high: 5}
  batch_size: 32
"""


def test_every_space_has_a_suggest_entry() -> None:
    assert set(SUGGEST) | {"fixed"} == set(SPACES)


def test_momentum_only_with_sgd_and_fixed_values_returned() -> None:
    spec = parse_spec(SPEC)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = sample_params(spec, trial)
        assert params["batch_size"] == 32
        assert ("momentum" in params) == (params["optimizer"] == "sgd")
        assert 1e-4 <= params["lr"] <= 1e-1 and 0 <= params["freeze_depth"] <= 5
        seen.add(params["optimizer"])
        study.tell(trial, params["lr"])
        hp = hparams_for(spec, params)
        assert hp.batch_size == 32 and hp.optimizer == params["optimizer"]
    assert seen == {"sgd", "adamw"}
    # Optuna records only sampled parameters; the constant is not a distribution.
    assert "batch_size" not in study.trials[0].distributions


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "qmc"])
def test_each_sampler_runs_the_conditional_space(sampler: str) -> None:
    spec = parse_spec(SPEC + f"searcher: {{sampler: {sampler}, seed: 0, n_startup_trials: 2}}\n")
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    fn = define_by_run(spec)
    for _ in range(4):
        t = study.ask()
        fn(t)
        study.tell(t, t.params["lr"])
    assert len(study.trials) == 4


def test_seeded_sampler_repeats() -> None:
    spec = parse_spec(SPEC)

    def draw() -> list:
        study = optuna.create_study(sampler=make_sampler(spec))
        out = []
        for _ in range(3):
            t = study.ask()
            out.append(sample_params(spec, t))
            study.tell(t, 0.5)
        return out

    assert draw() == draw()


@pytest.mark.parametrize("sched, n, plan", [
    ("{max_t: 4, grace_period: 1, reduction_factor: 2}", 16, [(1, 16), (2, 8), (4, 4)]),
    ("{max_t: 9, grace_period: 1, reduction_factor: 3}", 27, [(1, 27), (3, 9), (9, 3)]),
    ("{max_t: 4, grace_period: 2, reduction_factor: 2}", 8, [(2, 8), (4, 4)]),
    ("{max_t: 4, grace_period: 4, reduction_factor: 2}", 8, [(4, 8)]),
    ("{type: none}", 5, [(9, 5)]),
])
def test_rung_plan(sched: str, n: int, plan: list) -> None:
    spec = parse_spec(f"name: r\ntrain: {{max_epochs: 9}}\nscheduler: {sched}\nrun: {{num_samples: {n}}}\n")
    assert rung_plan(spec) == plan


def test_baseline_params_are_the_defaults_inside_the_space() -> None:
    spec = parse_spec(SPEC + "  weight_decay: {space: loguniform, low: 1.0e-3, high: 1.0e-1}\n")
    # lr 1e-3 and adamw are inside; momentum is inactive under adamw; the default weight decay
    # (1e-4) is outside its range; freeze_depth 0 is inside; batch_size is fixed.
    assert baseline_params(spec) == {"lr": 1e-3, "optimizer": "adamw", "freeze_depth": 0}
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(baseline_params(spec))
    first = sample_params(spec, study.ask())
    assert first["lr"] == 1e-3 and first["optimizer"] == "adamw" and "momentum" not in first


# -- the architecture as a search parameter ---------------------------------------------------
CHOICE = """\
name: c
model:
  arch: {space: choice, values: [mobilenet_v3_small, resnet18]}
search:
  lr: {space: loguniform, low: 1.0e-4, high: 1.0e-1}
  head_dropout: {space: uniform, low: 0.1, high: 0.5, when: {arch: resnet18}}
  freeze_depth: {space: int, low: 0, high: 5, when: {arch: [resnet18]}}
  freeze_fraction: {space: uniform, low: 0, high: 1, when: {arch: [mobilenet_v3_small]}}
"""


def test_arch_is_sampled_first_and_gates_its_parameters() -> None:
    spec = parse_spec(CHOICE)
    assert define_by_run(spec).order[0] == "arch"  # type: ignore[attr-defined]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = sample_params(spec, trial)
        arch = params["arch"]
        seen.add(arch)
        gated = {"head_dropout", "freeze_depth"} if arch == "resnet18" else {"freeze_fraction"}
        assert set(params) == {"arch", "lr", *gated}
        assert isinstance(trial.distributions["arch"], optuna.distributions.CategoricalDistribution)
        assert "arch" not in hparams_for(spec, params).model_dump()
        # The trial's single-arch spec searches exactly what was sampled beside the arch.
        assert set(spec.for_trial(params).search) == set(params) - {"arch"}
        study.tell(trial, params["lr"])
    assert seen == {"mobilenet_v3_small", "resnet18"}


def test_the_baseline_trains_the_first_listed_arch() -> None:
    spec = parse_spec(CHOICE)
    # head_dropout's default (0) is outside its range; freeze_depth 0 applies to resnet18 only.
    assert baseline_params(spec) == {"arch": "mobilenet_v3_small", "lr": 1e-3,
                                     "freeze_fraction": 0.0}
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(baseline_params(spec))
    first = sample_params(spec, study.ask())
    assert first["arch"] == "mobilenet_v3_small" and first["freeze_fraction"] == 0.0
