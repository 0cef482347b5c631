"""The spec: good specs load, bad ones are refused naming file, field, line and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytune_ft.errors import SpecError
from raytune_ft.knobs import Hyperparams, param_order
from raytune_ft.spec_io import load_spec, parse_spec, spec_to_yaml

ROOT = Path(__file__).resolve().parents[1]

BASE = "name: t\n"

# (spec text after `name: t`, field named in the error, YAML line, words the message must hold)
BAD = [
    ("search:\n  lr: {space: loguniform, low: 0, high: 1}\n", "search.lr.low", 3, "greater than 0"),
    ("search:\n  lr: {space: loguniform, low: -1.0e-3, high: 1}\n", "search.lr.low", 3, "greater"),
    ("search:\n  lr: {space: loguniform, low: 0.1, high: 0.01}\n", "search.lr", 3, "below high"),
    ("search:\n  lr: {space: gauss, low: 0.1, high: 1}\n", "search.lr.space", 3, "loguniform, uniform"),
    ("search:\n  lr: {low: 0.1, high: 1}\n", "search.lr.space", 3, "missing 'space:'"),
    ("search:\n  lr: {space: loguniform, low: 0.01, hi: 3}\n", "search.lr.hi", 3, "Did you mean 'high'"),
    ("search:\n  learning_rate: {space: loguniform, low: 0.01, high: 0.1}\n", "search.learning_rate", 3, "allowed: lr"),
    ("search:\n  activation: {space: choice, values: [relu, swish]}\n", "search.activation.values.1", 3, "'gelu'"),
    ("search:\n  init: {space: choice, values: [he]}\n", "search.init.values.0", 3, "'orthogonal'"),
    ("search:\n  optimizer: {space: choice, values: []}\n", "search.optimizer.values", 3, "at least 1"),
    ("search:\n  batch_size: {space: uniform, low: 16, high: 64}\n", "search.batch_size.space", 3, "space: int"),
    ("search:\n  momentum: {space: uniform, low: 0.8, high: 0.9, when: {optimizer: sgd}}\n", "search.momentum.when.optimizer", 3, "not a search parameter"),
    ("search:\n  optimizer: {space: choice, values: [adam, adamw]}\n  momentum: {space: uniform, low: 0.8, high: 0.9, when: {optimizer: sgd}}\n", "search.momentum.when.optimizer", 4, "never a value"),
    ("search:\n  lr: {space: loguniform, low: 0.001, high: 0.1}\n  momentum: {space: uniform, low: 0.8, high: 0.9, when: {lr: 0.01}}\n", "search.momentum.when.lr", 4, "choice or fixed"),
    ("run:\n  num_samples: 0\n", "run.num_samples", 3, "greater than or equal to 1"),
    ("run:\n  num_sample: 3\n", "run.num_sample", 3, "Did you mean 'num_samples'"),
    ("run:\n  resources: {gpu: 1.5}\n", "run.resources.gpu", 3, "whole number"),
    ("scheduler:\n  reduction_factor: 1\n", "scheduler.reduction_factor", 3, "greater than or equal to 2"),
    ("scheduler:\n  grace_period: 9\n", "scheduler.grace_period", 3, "allowed: 1..4"),
    ("scheduler:\n  max_t: 9\n", "scheduler.max_t", 3, "exceeds train.max_epochs"),
    ("scheduler:\n  type: hyperband\n", "scheduler.type", 3, "'asha' or 'none'"),
    ("searcher:\n  sampler: bayes\n", "searcher.sampler", 3, "'tpe', 'random', 'cmaes', 'gp' or 'qmc'"),
    ("model:\n  arch: resnet19\n", "model.arch", 3, "Did you mean resnet18"),
    ("data:\n  source: imagenet\n", "data.source", 3, "allowed: digits, mnist, imagefolder, CIFAR10"),
    ("data:\n  source: imagefolder\n", "data.root", 2, "needs data.root"),
    ("data:\n  val_fraction: 0.5\n  test_fraction: 0.45\n", "data", 2, "at least 10%"),
    ("train:\n  max_epochs: many\n", "train.max_epochs", 3, "valid integer"),
    ("metric: accuracy\n", "metric", 2, "'val_acc' or 'val_loss'"),
    ("colour: blue\n", "colour", 2, "unknown key"),
]


@pytest.mark.parametrize("body, field, line, words", BAD, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_spec_names_field_line_and_allowed(body: str, field: str, line: int, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(BASE + body, file="bad.yaml")
    e = info.value
    assert (e.file, e.field, e.line) == ("bad.yaml", field, line), str(e)
    assert words in str(e)
    assert str(e).startswith(f"bad.yaml, line {line}: field '{field}':")
    assert "\n" not in str(e)  # one paragraph


@pytest.mark.parametrize("text, line, words", [
    ("name: t\nname: u\n", 2, "duplicate key 'name' (first at line 1)"),
    ("name: t\ntrain:\n\tmax_epochs: 3\n", 3, "never tabs"),
    ("name: t\nsearch: [lr\n", 3, "YAML error"),
    ("!!python/object/apply:os.system ['echo owned']\n", 1, "no !!python"),
    ("", None, "empty"),
    ("- a\n- b\n", 1, "mapping"),
    ("name: ../../x\n", 1, "not a valid run name"),
    ("name: a/b\n", 1, "not a valid run name"),
    ("model: {arch: resnet18}\n", 1, "required"),
])
def test_bad_yaml_is_refused_with_line(text: str, line: int | None, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text, file="bad.yaml")
    assert info.value.line == line
    assert words in str(info.value)


def test_not_utf8_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match="not UTF-8") as info:
        load_spec(p)
    assert info.value.line == 1
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_default_spec_loads_and_round_trips() -> None:
    spec = load_spec(ROOT / "search_spaces" / "resnet.yaml")
    assert spec.model.weights == "rtft:mnist"
    assert spec.search["momentum"].when == {"optimizer": "sgd"}
    assert spec.search["batch_size"].space == "fixed"  # `batch_size: 32` shorthand
    again = parse_spec(spec_to_yaml(spec))
    assert again == spec
    assert spec.mode == "max" and spec.max_t == spec.train.max_epochs


@pytest.mark.parametrize("override, check", [
    ("run.num_samples=3", lambda s: s.run.num_samples == 3),
    ("search.lr.high=0.5", lambda s: s.search["lr"].high == 0.5),
    ("search.head_dropout=0.3", lambda s: s.search["head_dropout"].value == 0.3),
    ("run.resources={cpu: 2, gpu: 0.5}", lambda s: s.run.resources.gpu == 0.5),
    ("searcher.seed=null", lambda s: s.searcher.seed is None),
])
def test_set_overrides(override: str, check) -> None:  # noqa: ANN001
    spec = load_spec(ROOT / "search_spaces" / "resnet.yaml", [override])
    assert check(spec)


def test_bad_override_says_set() -> None:
    with pytest.raises(SpecError) as info:
        load_spec(ROOT / "search_spaces" / "resnet.yaml", ["run.num_samples=-2"])
    assert "(with --set)" in str(info.value) and info.value.line is None
    with pytest.raises(SpecError, match="expected key=value"):
        load_spec(ROOT / "search_spaces" / "resnet.yaml", ["run.num_samples"])


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


@pytest.mark.parametrize("body, size, flip", [
    ("", 32, False),  # digits: the source's natural size, no flip
    ("model: {arch: resnet18, weights: DEFAULT}\n", 224, False),  # the weights' crop size
    ("model: {arch: efficientnet_b3, weights: DEFAULT}\n", 300, False),
    ("model: {arch: resnet18, weights: DEFAULT}\ndata: {image_size: 64, hflip: true}\n", 64, True),
    ("data: {source: STL10, root: /tmp}\n", 96, True),
    ("model: {weights: w.pth}\n", 32, False),  # a file has no metadata
])
def test_data_defaults_resolved_from_weights_or_source(body: str, size: int, flip: bool) -> None:
    spec = parse_spec(BASE + body)
    assert (spec.data.image_size, spec.data.hflip) == (size, flip)
    assert parse_spec(spec_to_yaml(spec)) == spec  # spec.yaml in a run folder says what was used


def test_schema_import_pulls_in_neither_torch_nor_the_loader() -> None:
    import subprocess
    import sys

    code = ("import sys, raytune_ft.spec; "
            "print(sorted(m for m in ('torch', 'torchvision', 'yaml', 'raytune_ft.spec_io') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_error_keeps_its_cause_for_debug() -> None:
    from pydantic import ValidationError

    with pytest.raises(SpecError) as info:
        parse_spec(BASE + "run:\n  num_samples: 0\n")
    assert isinstance(info.value.__cause__, ValidationError)  # shown by --debug only
    assert "\n" not in str(info.value)


def test_int_range_may_hold_one_value_a_float_range_may_not() -> None:
    spec = parse_spec(BASE + "search:\n  batch_size: {space: int, low: 32, high: 32}\n")
    assert (spec.search["batch_size"].low, spec.search["batch_size"].high) == (32, 32)
    with pytest.raises(SpecError, match=r"low \(64\) must not exceed high \(32\)"):
        parse_spec(BASE + "search:\n  batch_size: {space: int, low: 64, high: 32}\n")
    with pytest.raises(SpecError, match=r"low \(0.5\) must be below high \(0.5\)"):
        parse_spec(BASE + "search:\n  momentum: {space: uniform, low: 0.5, high: 0.5}\n")
    with pytest.raises(SpecError, match="log: true needs low >= 1"):
        parse_spec(BASE + "search:\n  head_hidden: {space: int, low: 0, high: 8, log: true}\n")


def test_knobs_are_the_same_objects_through_spec() -> None:
    from raytune_ft import knobs, spec

    assert spec.Hyperparams is knobs.Hyperparams and spec.param_order is knobs.param_order
    assert spec.ACTIVATIONS == ("relu", "gelu", "silu", "leaky_relu", "elu", "mish", "tanh")
    assert spec.INITS[0] == "default" and "trunc_normal" in spec.INITS


def test_error_names_a_location_only_when_it_has_one() -> None:
    from raytune_ft.errors import UserError

    assert str(UserError("the cluster is gone")) == "the cluster is gone"
    assert str(UserError("bad", field="run.resources")) == "<spec>: field 'run.resources': bad"
    assert str(UserError("bad", file="a.yaml")) == "a.yaml: bad"
    assert str(UserError("two\nlines")) == "two\\nlines"  # still one paragraph


@pytest.mark.parametrize("message, first", [
    ("\n  boom\nsecond line\n", "boom"),
    ("one line", "one line"),
    ("", "KeyError"),
])
def test_first_line_of_an_exception(message: str, first: str) -> None:
    from raytune_ft.errors import first_line

    exc = KeyError() if not message else RuntimeError(message)
    assert first_line(exc) == first
