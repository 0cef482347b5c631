"""Portfolios (portfolio.py): the built-in one, files read and refused in one line, and the
mapping onto a spec's space (clipped, dropped, `when:`, architectures in turn, no repeats)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_spec

from raytune_ft import portfolio
from raytune_ft.errors import UserError
from raytune_ft.knobs import Hyperparams
from raytune_ft.spec.yaml_io import load_spec, parse_spec

KNOBS = ", ".join(Hyperparams.model_fields)


def _file(tmp_path: Path, data: object, name: str = "pf.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else str(data))
    return path


def _refused(path: Path) -> str:
    with pytest.raises(UserError) as e:
        portfolio.load(path)
    assert e.value.field == "searcher.portfolio"
    assert "\n" not in str(e.value)
    return e.value.message


# -- files -----------------------------------------------------------------------------------
def test_the_builtin_portfolio_is_valid_package_data() -> None:
    pf = portfolio.builtin()
    assert pf.source == "builtin" and len(pf.configs) == 4 and pf.about
    assert all(set(c) <= set(Hyperparams.model_fields) for c in pf.configs)
    spec = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / "resnet.yaml")
    assert spec.searcher.portfolio == "builtin"
    plan = portfolio.plan_for(spec)
    assert plan is not None and len(plan.enqueue) == 4 and not plan.notes  # its own space


def test_write_then_load_round_trips_and_refuses_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "pf.json"
    configs = [{"lr": 0.01, "optimizer": "sgd", "momentum": 0.9}, {"lr": 1, "head_hidden": 128}]
    assert portfolio.write(path, configs, "two by hand") == path
    pf = portfolio.load(path)
    assert pf.about == "two by hand" and pf.source == str(path)
    assert pf.configs == [configs[0], {"lr": 1.0, "head_hidden": 128}]
    assert isinstance(pf.configs[1]["lr"], float)  # the knob's own type
    with pytest.raises(UserError, match=r"configs\[0\]\.lr: got 0"):
        portfolio.write(tmp_path / "bad.json", [{"lr": 0}], "")
    assert not (tmp_path / "bad.json").exists()


def test_a_bare_list_and_yaml_are_read(tmp_path: Path) -> None:
    assert portfolio.load(_file(tmp_path, [{"lr": 0.01}])).configs == [{"lr": 0.01}]
    pf = portfolio.load(_file(tmp_path, "about: mine\nconfigs:\n  - {lr: 0.02, init: orthogonal}\n",
                              "pf.yaml"))
    assert pf.configs == [{"lr": 0.02, "init": "orthogonal"}] and pf.about == "mine"


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = portfolio.write(tmp_path / "pf.json", [{"lr": 0.01}], "old")

    def crash(self: Path, data: str, *args: object, **kwargs: object) -> int:
        with open(self, "w") as f:  # half of it written, then the disk is full
            f.write(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(OSError):
        portfolio.write(path, [{"lr": 0.02}], "new")
    monkeypatch.undo()
    assert portfolio.load(path).about == "old"  # the old file whole, no temporary left
    assert [p.name for p in tmp_path.iterdir()] == ["pf.json"]


def test_yaml_numbers_read_as_the_spec_reads_them(tmp_path: Path) -> None:
    """`lr: 1e-3` is a number (YAML 1.2; PyYAML's 1.1 reads text), as in the spec; quoted,
    it is text, refused for a number like any text."""
    pf = portfolio.load(_file(tmp_path, "configs:\n  - {lr: 1e-3, weight_decay: 5E-5, "
                                        "grad_clip: 1e0, momentum: .5, backbone_lr_mult: "
                                        "2.5e+0}\n", "pf.yaml"))
    assert pf.configs == [{"lr": 0.001, "weight_decay": 5e-5, "grad_clip": 1.0,
                           "momentum": 0.5, "backbone_lr_mult": 2.5}]
    for quoted, text in (('"1e-3"', "1e-3"), ("'0.1'", "0.1")):
        path = _file(tmp_path, f"configs: [{{lr: {quoted}}}]\n", "q.yaml")
        assert _refused(path) == f"{path}: configs[0].lr: got {text!r}; allowed: a number " \
                                 f"in (0, 10]"


@pytest.mark.parametrize("text, message", [
    ("configs:\n  - lr: 0.1\n    lr: 0.2\n",
     "not YAML (line 3: duplicate key 'lr' (first at line 2)); allowed: {configs: "),
    ("about: a\nabout: b\nconfigs: []\n", "not YAML (line 2: duplicate key 'about'"),
    ("configs: [{? [lr]: 0.1}]\n", "not YAML (line 1: a key must be a plain word"),
    ("a: &a [" + ", ".join(["0"] * 100) + "]\nb: &b [" + ", ".join(["*a"] * 100) + "]\n"
     "c: [" + ", ".join(["*b"] * 100) + "]\n",
     "not YAML (line 3: more than 100,000 values once aliases are expanded)"),
    ("configs: [{lr: !!python/name:os.system }]\n",
     "not YAML (line 1: could not determine a constructor for the tag"),
], ids=["duplicate_knob", "duplicate_key", "list_as_key", "alias_bomb", "python_tag"])
def test_yaml_is_read_with_the_specs_strict_loader(tmp_path: Path, text: str,
                                                    message: str) -> None:
    path = _file(tmp_path, text, "pf.yaml")
    assert _refused(path).startswith(f"{path}: {message}")


@pytest.mark.parametrize("data, message", [
    ({"configs": [{"lr": 0.01}, {"weight_decy": 0.01}]},
     f"configs[1].weight_decy: unknown knob; allowed: {KNOBS}. Did you mean 'weight_decay'?"),
    ({"configs": [{"lr": 50}]}, "configs[0].lr: got 50; allowed: a number in (0, 10]"),
    ([{"optimizer": "sgd"}, {"freeze_depth": 1.5}],
     "configs[1].freeze_depth: got 1.5; allowed: a whole number in [0, 64]"),
    ([{"lr": "fast"}], "configs[0].lr: got 'fast'; allowed: a number in (0, 10]"),
    ([{"lr": True}], "configs[0].lr: got True; allowed: a number in (0, 10]"),
    ([{"optimizer": "lion"}], "configs[0].optimizer: got 'lion'; allowed: one of 'sgd', "
                              "'adam', 'adamw'"),
    ([{"momentum": 1.0}], "configs[0].momentum: got 1.0; allowed: a number in [0, 1)"),
    ([{"grad_clip": -1}], "configs[0].grad_clip: got -1; allowed: a number in [0, inf)"),
    ([{"bn_momentum": 2}], "configs[0].bn_momentum: got 2; allowed: a number in (0, 1], or "
                           "null (the architecture's own)"),
    ([{"lr": [0.1]}], "configs[0].lr: got [0.1]; allowed: a number in (0, 10]"),
    ([{"arch": "resnet18"}], "configs[0].arch: not a knob: the architecture is model.arch"),
    ([["lr", 0.1]], "configs[0]: got ['lr', 0.1]; allowed: a mapping knob → value"),
    ({"config": []}, "unknown key 'config'; allowed: configs, about"),
    ({"about": "x"}, "no 'configs'; allowed: {configs: "),
    ({"configs": {"lr": 0.1}}, "configs: got dict; allowed: a list of {knob: value}"),
    ({"configs": [], "about": 3}, "about: got 3; allowed: text"),
    ("just text", "not a portfolio (got str); allowed: {configs: "),
])
def test_a_bad_file_is_refused_in_one_line_naming_file_and_entry(
        tmp_path: Path, data: object, message: str) -> None:
    path = _file(tmp_path, data)
    assert _refused(path).startswith(f"{path}: {message}")


def test_unreadable_or_missing_files_are_refused(tmp_path: Path) -> None:
    assert _refused(tmp_path / "nope.json") == (
        f"'{tmp_path / 'nope.json'}' does not exist; allowed: builtin, none, or the path of a "
        f"portfolio file (JSON or YAML)")
    assert "is a folder" in _refused(tmp_path)
    bad_json = tmp_path / "b.json"
    bad_json.write_text("{configs: [}")
    assert _refused(bad_json).startswith(f"{bad_json}: unreadable (")
    bad_yaml = tmp_path / "b.yaml"
    bad_yaml.write_text("configs: [{lr: 0.1}\n")
    assert _refused(bad_yaml).startswith(f"{bad_yaml}: not YAML (")


# -- onto a spec's space ---------------------------------------------------------------------
def _pf(*configs: dict) -> portfolio.Portfolio:
    return portfolio.Portfolio(portfolio.check_configs(list(configs), "t"), "", "t")


def test_configurations_are_clipped_dropped_and_not_repeated(tmp_path: Path) -> None:
    # tiny: lr [1e-3, 1e-2], optimizer {sgd, adamw}, momentum [0.8, 0.95] when sgd,
    # freeze_depth [0, 2], batch_size 32 and augment none fixed.
    spec = tiny_spec(tmp_path)
    pf = _pf({"lr": 0.05, "optimizer": "sgd", "momentum": 0.99, "freeze_depth": 4,
              "init": "orthogonal", "head_hidden": 64},
             {"lr": 0.003, "optimizer": "adamw", "momentum": 0.9, "freeze_depth": 1},
             {"lr": 0.001, "optimizer": "adamw", "freeze_depth": 0},  # the baseline
             {"lr": 0.003, "optimizer": "adamw", "freeze_depth": 1, "augment": "strong"},
             {"batch_size": 64})
    plan = portfolio.plan(spec, pf)
    assert plan.enqueue == [{"lr": 0.01, "optimizer": "sgd", "momentum": 0.95, "freeze_depth": 2},
                            {"lr": 0.003, "optimizer": "adamw", "freeze_depth": 1}]
    assert plan.notes == [
        "portfolio configs[0]: lr=0.05 clipped to 0.01; freeze_depth=4 clipped to 2; "
        "momentum=0.99 clipped to 0.95; not searched here: init, head_hidden",
        "portfolio configs[1]: momentum dropped (inactive here)",
        "portfolio configs[2]: the same as the baseline in this space; not tried twice",
        "portfolio configs[3]: the same as an earlier configuration in this space; not tried "
        "twice",
        "portfolio configs[4]: nothing of it is searched here; not tried"]
    # Without the baseline the default configuration is tried; after a warm start that tried
    # configs[1] already, that one is not.
    no_base = spec.model_copy(update={"searcher": spec.searcher.model_copy(
        update={"baseline_first": False})})
    assert {"lr": 0.001, "optimizer": "adamw", "freeze_depth": 0} in \
        portfolio.plan(no_base, pf).enqueue
    warm = portfolio.plan(spec, pf, warm=[{"lr": 0.003, "optimizer": "adamw", "freeze_depth": 1}])
    assert len(warm.enqueue) == 1 and \
        "configs[1]: the same as a warm-start configuration" in " | ".join(warm.notes)


def test_fixed_values_are_respected_and_noted() -> None:
    spec = parse_spec("name: t\nsearch:\n  lr: {space: loguniform, low: 1.0e-3, high: 1.0e-2}\n"
                      "  optimizer: adamw\n  freeze_depth: 1\n", file="t.yaml")
    plan = portfolio.plan(spec, _pf({"lr": 0.002, "optimizer": "sgd", "momentum": 0.9,
                                     "freeze_depth": 1}))
    assert plan.enqueue == [{"lr": 0.002}]  # fixed values are the spec's, never enqueued
    assert plan.notes == ["portfolio configs[0]: optimizer='sgd' differs from this search's "
                          "fixed 'adamw'; not searched here: momentum"]


ARCHS = """\
name: t
model: {arch: {space: choice, values: [resnet18, mobilenet_v3_small, regnet_x_400mf]},
        weights: none}
data: {source: digits, image_size: 32}
search:
  lr: {space: loguniform, low: 1.0e-3, high: 1.0e-2}
  head_dropout: {space: uniform, low: 0.0, high: 0.3, when: {arch: [mobilenet_v3_small]}}
"""


def test_architectures_of_a_choice_take_turns_from_the_second() -> None:
    spec = parse_spec(ARCHS, file="t.yaml")
    same = {"lr": 0.002, "head_dropout": 0.1}
    plan = portfolio.plan(spec, _pf(same, same, same, same, {"lr": 0.001}))
    assert plan.enqueue == [
        {"arch": "mobilenet_v3_small", "lr": 0.002, "head_dropout": 0.1},
        {"arch": "regnet_x_400mf", "lr": 0.002},  # head_dropout: only for mobilenet
        {"arch": "resnet18", "lr": 0.002},
        # configs[3] is configs[0] again; configs[4] on resnet18 would be the baseline, but
        # its turn gives it the third architecture
        {"arch": "regnet_x_400mf", "lr": 0.001}]
    assert plan.notes == [
        "portfolio configs[1]: head_dropout dropped (inactive here)",
        "portfolio configs[2]: head_dropout dropped (inactive here)",
        "portfolio configs[3]: the same as an earlier configuration in this space; not tried "
        "twice"]


def test_none_reads_nothing_and_a_path_is_read(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    assert spec.searcher.portfolio == "none" and portfolio.plan_for(spec) is None
    path = _file(tmp_path, {"configs": [{"lr": 0.004}], "about": "one"})
    with_file = spec.model_copy(update={"searcher": spec.searcher.model_copy(
        update={"portfolio": str(path)})})
    plan = portfolio.plan_for(with_file)
    assert plan is not None and plan.source == str(path) and plan.enqueue == [{"lr": 0.004}]
    lines = portfolio.describe(plan, with_file, first=4)  # tiny: num_samples 4
    assert lines[1] == "   1. lr=0.004  (not run: beyond run.num_samples)"


def test_an_empty_portfolio_name_is_refused() -> None:
    with pytest.raises(UserError, match="field 'searcher.portfolio': empty; allowed: builtin"):
        parse_spec("name: t\nsearcher: {portfolio: ''}\n", file="t.yaml")
