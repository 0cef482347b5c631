"""Knobs (knobs.py): hyperparameters, search parameters, conditions and their order."""

from __future__ import annotations

import pytest
from helpers import BASE

from raytune_ft.errors import SpecError
from raytune_ft.knobs import Hyperparams, param_order, params_for_arch
from raytune_ft.spec.yaml_io import parse_spec


def test_condition_parents_come_first() -> None:
    spec = parse_spec(BASE + "search:\n  momentum: {space: uniform, low: 0.1, high: 0.9, "
                             "when: {optimizer: sgd}}\n  optimizer: {space: choice, values: [sgd, adam]}\n")
    order = param_order(spec.search)
    assert order.index("optimizer") < order.index("momentum")


def test_condition_cycle_refused() -> None:
    text = (BASE + "search:\n  optimizer: {space: choice, values: [sgd], when: {augment: none}}\n"
            "  augment: {space: choice, values: [none], when: {optimizer: sgd}}\n")
    with pytest.raises(SpecError, match="cycle"):
        parse_spec(text)


def test_hyperparams_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="lr"):
        Hyperparams(lr=0)


def test_int_range_may_hold_one_value_a_float_range_may_not() -> None:
    spec = parse_spec(BASE + "search:\n  batch_size: {space: int, low: 32, high: 32}\n")
    assert (spec.search["batch_size"].low, spec.search["batch_size"].high) == (32, 32)
    with pytest.raises(SpecError, match=r"low \(64\) must not exceed high \(32\)"):
        parse_spec(BASE + "search:\n  batch_size: {space: int, low: 64, high: 32}\n")
    with pytest.raises(SpecError, match=r"low \(0.5\) must be below high \(0.5\)"):
        parse_spec(BASE + "search:\n  momentum: {space: uniform, low: 0.5, high: 0.5}\n")
    with pytest.raises(SpecError, match="log: true needs low >= 1"):
        parse_spec(BASE + "search:\n  head_hidden: {space: int, low: 0, high: 8, log: true}\n")


def test_freeze_fraction_is_a_share() -> None:
    assert Hyperparams().freeze_fraction == 0.0
    assert Hyperparams(freeze_fraction=1).freeze_fraction == 1.0
    for bad in (-0.1, 1.01):
        with pytest.raises(ValueError, match="freeze_fraction"):
            Hyperparams(freeze_fraction=bad)


def test_arch_comes_first_in_the_order_of_a_choice_spec() -> None:
    spec = parse_spec(BASE + "model:\n  arch: {space: choice, values: [resnet18, alexnet]}\n"
                             "search:\n  head_dropout: {space: uniform, low: 0, high: 0.5, "
                             "when: {arch: alexnet}}\n  lr: {space: loguniform, low: 0.001, "
                             "high: 0.1}\n")
    assert param_order(spec.params) == ["arch", "lr", "head_dropout"]
    # Without `arch` among them, a condition on it does not order anything.
    assert param_order(spec.search) == ["head_dropout", "lr"]


def test_params_for_arch_drops_what_never_applies() -> None:
    spec = parse_spec(BASE + "model:\n  arch: {space: choice, values: [resnet18, alexnet]}\n"
                             "search:\n  optimizer: {space: choice, values: [sgd, adam], "
                             "when: {arch: resnet18}}\n  momentum: {space: uniform, low: 0.5, "
                             "high: 0.9, when: {optimizer: sgd}}\n  lr: {space: loguniform, "
                             "low: 0.001, high: 0.1}\n")
    assert list(params_for_arch(spec.search, "alexnet")) == ["lr"]
    kept = params_for_arch(spec.search, "resnet18")
    assert list(kept) == ["optimizer", "momentum", "lr"]
    assert kept["optimizer"].when is None and kept["momentum"].when == {"optimizer": "sgd"}
    assert spec.search["optimizer"].when == {"arch": "resnet18"}  # the spec is unchanged
