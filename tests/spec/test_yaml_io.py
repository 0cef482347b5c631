"""Spec files (spec_io.py): YAML read strictly, refused with its line; --set overrides; a spec
written back reads the same; and (hypothesis) the loader never fails any other way than a
one-line SpecError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import BASE, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytune_ft import knobs
from raytune_ft.errors import SpecError
from raytune_ft.spec import schema as spec_mod
from raytune_ft.spec.schema import Spec
from raytune_ft.spec.searcher import SchedulerSpec, SearcherSpec
from raytune_ft.spec.yaml_io import load_spec, parse_spec, spec_to_yaml


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


def test_set_makes_the_arch_a_choice_with_weights_per_arch() -> None:
    spec = load_spec(ROOT / "search_spaces" / "resnet.yaml", [
        "model.arch={space: choice, values: [resnet18, mobilenet_v3_small]}",
        "model.weights={resnet18: none, mobilenet_v3_small: none}"])
    assert spec.archs == ["resnet18", "mobilenet_v3_small"]
    assert parse_spec(spec_to_yaml(spec)) == spec
    with pytest.raises(SpecError) as info:
        load_spec(ROOT / "search_spaces" / "resnet.yaml", ["promote.max_latency_ms=-1"])
    assert str(info.value).endswith("(with --set): field 'promote.max_latency_ms': got -1; "
                                    "input should be greater than 0")


def test_bad_override_says_set() -> None:
    with pytest.raises(SpecError) as info:
        load_spec(ROOT / "search_spaces" / "resnet.yaml", ["run.num_samples=-2"])
    assert "(with --set)" in str(info.value) and info.value.line is None
    with pytest.raises(SpecError, match="expected key=value"):
        load_spec(ROOT / "search_spaces" / "resnet.yaml", ["run.num_samples"])


def test_error_keeps_its_cause_for_debug() -> None:
    from pydantic import ValidationError

    with pytest.raises(SpecError) as info:
        parse_spec(BASE + "run:\n  num_samples: 0\n")
    assert isinstance(info.value.__cause__, ValidationError)  # shown by --debug only
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Property: anything fed to the loader gives a Spec or a SpecError (one line), never another
# exception. 200 examples per property; no example database written into the checkout.
# --------------------------------------------------------------------------------------------
PROPERTY = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _load_or_refuse(load: Any) -> Spec | SpecError:
    try:
        spec = load()
    except SpecError as e:
        assert "\n" not in str(e), str(e)  # one paragraph
        return e
    assert isinstance(spec, Spec)
    assert parse_spec(spec_to_yaml(spec)) == spec  # a valid spec round-trips
    return spec


@PROPERTY
@given(st.binary(max_size=600))
def test_any_bytes_give_a_spec_or_a_spec_error(tmp_path_factory: pytest.TempPathFactory,
                                               data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes", numbered=True) / "spec.yaml"
    path.write_bytes(data)
    _load_or_refuse(lambda: load_spec(path))


SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=12))
ANY_TREE = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.text(max_size=8) | st.integers(), kids, max_size=4),
                        max_leaves=25)


@PROPERTY
@given(st.dictionaries(st.text(max_size=10), ANY_TREE, max_size=6))
def test_any_mapping_gives_a_spec_or_a_spec_error(mapping: dict) -> None:
    _load_or_refuse(lambda: parse_spec(yaml.safe_dump(mapping), file="random.yaml"))


# Mappings spelt with the real field names and plausible values reach the deep validators
# (conditions, ranges against knobs, cross-section checks) that random keys never do.
FIELD_NAMES = sorted({n for m in [spec_mod.Spec, spec_mod.ModelSpec, spec_mod.DataSpec,
                                  spec_mod.TrainSpec, SearcherSpec, SchedulerSpec,
                                  spec_mod.RunSpec, spec_mod.Resources, spec_mod.PromoteSpec,
                                  knobs.Hyperparams, knobs.IntRange, knobs.Choice, knobs.Fixed]
                      for n in m.model_fields} | {"resources"})
WORDS = st.sampled_from(["sgd", "adam", "adamw", "relu", "none", "light", "asha", "tpe",
                         "choice", "uniform", "loguniform", "int", "fixed", "digits", "val_acc",
                         "resnet18", "mobilenet_v3_small", "t", "", "../x", "auto"])
VALUES = (st.integers(-3, 70) | st.floats(-2, 2) | st.sampled_from([1e-4, 0.5, 0.99, 1e9])
          | st.booleans() | st.none() | WORDS)
FIELD_TREE = st.recursive(VALUES, lambda kids: st.lists(kids, max_size=3)
                          | st.dictionaries(st.sampled_from(FIELD_NAMES), kids, max_size=5),
                          max_leaves=30)


@PROPERTY
@given(st.dictionaries(st.sampled_from(FIELD_NAMES), FIELD_TREE, max_size=8),
       st.booleans())
def test_mappings_of_real_field_names_give_a_spec_or_a_spec_error(mapping: dict,
                                                                  named: bool) -> None:
    if named:
        mapping = {"name": "t", **mapping}
    _load_or_refuse(lambda: parse_spec(yaml.safe_dump(mapping), file="fields.yaml"))


ARCH_OK = st.sampled_from(["resnet18", "mobilenet_v3_small", "alexnet"])
ARCHS = st.one_of(ARCH_OK, ARCH_OK, ARCH_OK, st.sampled_from(["resnet19", "vgg11", 3]))
KNOB_WHEN = st.dictionaries(
    st.sampled_from(["arch", "arch", "optimizer"]),
    ARCHS | st.lists(ARCHS, max_size=3) | st.sampled_from(["sgd", ["sgd", "adam"]]),
    max_size=2)
WEIGHTS = st.sampled_from(["none", "DEFAULT", "IMAGENET1K_V2", "w.pth"])


@PROPERTY
@given(st.one_of(ARCHS,
                 st.fixed_dictionaries({"space": st.just("choice"),
                                        "values": st.lists(ARCH_OK, min_size=1, max_size=3,
                                                           unique=True)}),
                 st.fixed_dictionaries({"space": st.sampled_from(["choice", "uniform"]),
                                        "values": st.lists(ARCHS, max_size=4)},
                                       optional={"when": KNOB_WHEN})),
       st.one_of(WEIGHTS, WEIGHTS, st.dictionaries(ARCHS, WEIGHTS | st.just(1), max_size=4)),
       st.lists(st.tuples(st.sampled_from(["head_dropout", "momentum", "optimizer"]),
                          st.none() | KNOB_WHEN), max_size=3, unique_by=lambda x: x[0]))
def test_arch_choices_give_a_spec_or_a_spec_error(arch: Any, weights: Any,
                                                  params: list) -> None:
    search: dict[str, Any] = {}
    for name, when in params:
        p: dict[str, Any] = ({"space": "choice", "values": ["sgd", "adam"]}
                             if name == "optimizer" else {"space": "uniform", "low": 0.1,
                                                           "high": 0.5})
        search[name] = {**p, "when": when}
    mapping = {"name": "t", "model": {"arch": arch, "weights": weights}, "search": search}
    got = _load_or_refuse(lambda: parse_spec(yaml.safe_dump(mapping), file="arch.yaml"))
    if isinstance(got, Spec):  # every architecture of a valid spec is a valid spec alone
        for a in got.archs:
            one = got.for_arch(a)
            assert (one.model.arch, one.arch_searched, one.data.image_size > 0) == (a, False, True)
            assert set(one.search) <= set(got.search)


@PROPERTY
@given(st.data())
def test_every_arch_of_a_choice_spec_is_a_spec_alone(data: st.DataObject) -> None:
    archs = data.draw(st.lists(ARCH_OK, min_size=1, max_size=3, unique=True))
    some = st.lists(st.sampled_from(archs), min_size=1, max_size=3, unique=True)
    weights = data.draw(WEIGHTS | st.fixed_dictionaries({a: WEIGHTS for a in archs}))
    search: dict[str, Any] = {"optimizer": {"space": "choice", "values": ["sgd", "adam"]}}
    gates: dict[str, list[str]] = {}
    for name in data.draw(st.lists(st.sampled_from(["head_dropout", "momentum",
                                                     "label_smoothing"]), unique=True)):
        when: dict[str, Any] = {}
        if data.draw(st.booleans()):
            when["arch"] = gates[name] = data.draw(some)
        if data.draw(st.booleans()):
            when["optimizer"] = "sgd"
        search[name] = {"space": "uniform", "low": 0.1, "high": 0.5, "when": when or None}
    mapping = {"name": "t", "search": search,
               "model": {"arch": {"space": "choice", "values": archs}, "weights": weights}}
    text = yaml.safe_dump(mapping, sort_keys=False)  # the spec's order is the search's
    spec = _load_or_refuse(lambda: parse_spec(text, file="arch.yaml"))
    assert isinstance(spec, Spec), str(spec)  # weights names are checked by the dry run
    assert list(spec.params) == ["arch", *search] and spec.data.image_size is None
    for a in archs:
        one = spec.for_arch(a)
        assert list(one.search) == [n for n in search if a in gates.get(n, [a])]
        assert all("arch" not in (p.when or {}) for p in one.search.values())
        assert one.model.weights == (weights[a] if isinstance(weights, dict) else weights)
        assert one.data.image_size == (224 if one.model.weights == "DEFAULT" else 32)


def test_found_by_the_properties() -> None:
    """What fuzzing the loader found, kept as plain cases."""
    bad = {
        "name: t\n? [a, b]\n: 1\n": "a key must be a plain word",           # was TypeError
        "name: t\nrun: {resources: {gpu: .inf}}\n": "finite number",          # OverflowError
        "name: t\nrun: {resources: {cpu: .nan}}\n": "finite number",          # passed as NaN
        "name: t\n" + "x: " + "[" * 200 + "]" * 200 + "\n": "nested deeper",  # RecursionError
    }
    for text, words in bad.items():
        with pytest.raises(SpecError, match=words):
            parse_spec(text)
    # `<<: *base` merges are plain YAML: allowed, and a merged key may be overridden.
    spec = parse_spec("name: t\nrun:\n  <<: {num_samples: 3, max_failures: 1}\n"
                      "  num_samples: 5\n")
    assert (spec.run.num_samples, spec.run.max_failures) == (5, 1)
