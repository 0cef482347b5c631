"""The spec schema (spec.py): bad specs are refused naming file, field, line and what is
allowed; defaults resolved; a light import; check_fit, the resources a trial needs against what
the machines have."""

from __future__ import annotations

import pytest
from helpers import BASE, ROOT

from raytune_ft.errors import SpecError
from raytune_ft.spec.schema import check_fit
from raytune_ft.spec.yaml_io import parse_spec, spec_to_yaml

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
    ("run:\n  num_samples: 100001\n", "run.num_samples", 3, "allowed: 1..100,000"),
    ("search:\n  distill_alpha: {space: uniform, low: 0.1, high: 0.9}\n", "search.distill_alpha", 3, "only counts with model.teacher"),
    ("search:\n  distill_alpha: 0\n", "search.distill_alpha", 3, "the knob would do nothing"),
    ("search:\n  distill_temperature: {space: choice, values: [2.0, 8.0]}\n", "search.distill_temperature", 3, "set model.teacher"),
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
    # A choice of architectures, weights per architecture, conditions on the architecture.
    ("model:\n  arch: {space: choice, values: [resnet18, mobilenet_v3_smal]}\n", "model.arch.values.1", 3, "Did you mean mobilenet_v3_small"),
    ("model:\n  arch: {space: choice, values: [resnet18, resnet18]}\n", "model.arch.values.1", 3, "listed twice"),
    ("model:\n  arch: {space: choice, values: [resnet18, 18]}\n", "model.arch.values.1", 3, "got 18; allowed: a torchvision architecture name"),
    ("model:\n  arch: {space: choice, values: []}\n", "model.arch.values", 3, "at least 1"),
    ("model:\n  arch: {space: choice, vals: [resnet18]}\n", "model.arch.vals", 3, "unknown key; allowed: space, values"),
    ("model:\n  arch: {space: uniform, low: 1, high: 2}\n", "model.arch", 3, "allowed: an architecture name such as resnet18, or {space: choice"),
    ("model:\n  arch: [resnet18, alexnet]\n", "model.arch", 3, "allowed: an architecture name"),
    ("model:\n  arch: {space: choice, values: [resnet18], when: {x: 1}}\n", "model.arch.when", 3, "sampled first"),
    ("model:\n  arch: {space: choice, values: [resnet18, alexnet]}\n  factory: m.net:build\n", "model.factory", 4, "model.factory builds one network"),
    ("model:\n  arch: {space: choice, values: [resnet18, alexnet]}\n  weights: {resnet18: DEFAULT}\n", "model.weights", 4, "no weights for alexnet; allowed: one value for every architecture"),
    ("model:\n  arch: {space: choice, values: [resnet18, alexnet]}\n  weights: {resnet18: none, alexnet: none, vgg11: none}\n", "model.weights.vgg11", 4, "'vgg11' is not an architecture of model.arch; allowed: one entry per architecture (resnet18, alexnet)"),
    ("model:\n  arch: {space: choice, values: [resnet18, alexnet]}\n  weights: {resnet18: none, alexnet: 1}\n", "model.weights.alexnet", 4, "got 1"),
    ("model:\n  weights: 7\n", "model.weights", 3, "or a mapping architecture"),
    ("model:\n  arch: resnet18\n  weights: {resnet34: DEFAULT}\n", "model.weights.resnet34", 4, "one entry per architecture (resnet18)"),
    ("model:\n  arch: {space: choice, values: [resnet18, alexnet]}\nsearch:\n  head_dropout: {space: uniform, low: 0, high: 0.5, when: {arch: [resnet18, vgg11]}}\n", "search.head_dropout.when.arch", 5, "'vgg11' is never a value of 'arch'; allowed: 'resnet18', 'alexnet'"),
    ("search:\n  head_dropout: {space: uniform, low: 0, high: 0.5, when: {arch: resnet18}}\n", "search.head_dropout.when.arch", 3, "needs model.arch to be a choice"),
    ("search:\n  freeze_fraction: {space: uniform, low: 0, high: 1.5}\n", "search.freeze_fraction.high", 3, "less than or equal to 1"),
    ("promote:\n  max_latency_ms: 0\n", "promote.max_latency_ms", 3, "got 0; input should be greater than 0"),
    ("promote:\n  max_latency_ms: -2.5\n", "promote.max_latency_ms", 3, "greater than 0"),
    ("promote:\n  max_latency_ms: .inf\n", "promote.max_latency_ms", 3, "finite number"),
    ("promote:\n  max_params: 0\n", "promote.max_params", 3, "greater than 0"),
    ("promote:\n  max_params: 1.5\n", "promote.max_params", 3, "valid integer"),
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

    code = ("import sys, raytune_ft.spec.schema; "
            "print(sorted(m for m in ('torch', 'torchvision', 'yaml', 'raytune_ft.spec.yaml_io') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_knobs_the_schema_checks_are_the_trainers() -> None:
    from raytune_ft import knobs

    assert knobs.ACTIVATIONS == ("relu", "gelu", "silu", "leaky_relu", "elu", "mish", "tanh",
                                 "sigmoid")
    assert knobs.INITS[0] == "default" and "trunc_normal" in knobs.INITS


def test_a_spec_pickled_by_0_1_0_still_loads(tmp_path) -> None:
    """rtft 0.1.0 pickled its specs into a run's Tuner and searcher state naming
    `raytune_ft.spec.Spec`, `raytune_ft.spec.LogUniform` (one module then) and
    `raytune_ft.spec_searcher.SearcherSpec`: a fresh process loads them as today's classes."""
    import pickle
    import subprocess
    import sys

    from raytune_ft.spec.yaml_io import load_spec

    spec = load_spec(ROOT / "search_spaces" / "resnet.yaml")
    # Protocol 0 names a class as text ("c<module>\n<name>\n"): swap in 0.1.0's modules.
    new = pickle.dumps(spec, protocol=0)
    old = (new.replace(b"craytune_ft.spec.schema\n", b"craytune_ft.spec\n")
           .replace(b"craytune_ft.knobs\n", b"craytune_ft.spec\n")
           .replace(b"craytune_ft.spec.searcher\n", b"craytune_ft.spec_searcher\n"))
    assert b"craytune_ft.spec_searcher\n" in old and b"craytune_ft.spec\nLogUniform" in old
    (tmp_path / "old.pkl").write_bytes(old)
    code = ("import pickle, sys; s = pickle.load(open(sys.argv[1], 'rb')); "
            "print(type(s).__module__, type(s.searcher).__module__, "
            "type(s.search['lr']).__module__, s.model_dump() == pickle.load(open(sys.argv[2], "
            "'rb')).model_dump())")
    (tmp_path / "new.pkl").write_bytes(new)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "old.pkl"),
                          str(tmp_path / "new.pkl")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["raytune_ft.spec.schema", "raytune_ft.spec.searcher",
                                  "raytune_ft.knobs", "True"]



# --------------------------------------------------------------------------------------------
# model.arch as a choice: Spec.archs / arch_searched / params / for_arch / for_trial.
# --------------------------------------------------------------------------------------------
CHOICE = """\
name: c
model:
  arch: {space: choice, values: [resnet18, mobilenet_v3_small, alexnet]}
  weights: {resnet18: DEFAULT, mobilenet_v3_small: none, alexnet: w.pth}
search:
  lr: {space: loguniform, low: 1.0e-4, high: 1.0e-2}
  optimizer: {space: choice, values: [sgd, adamw]}
  momentum: {space: uniform, low: 0.8, high: 0.95, when: {optimizer: sgd}}
  head_dropout: {space: uniform, low: 0, high: 0.5, when: {arch: [resnet18, alexnet]}}
  head_hidden: {space: int, low: 0, high: 64, when: {arch: resnet18, optimizer: adamw}}
  activation: {space: choice, values: [relu, gelu], when: {arch: [mobilenet_v3_small]}}
  activation_scope: {space: choice, values: [head, all], when: {activation: gelu}}
  freeze_fraction: {space: uniform, low: 0, high: 1}
"""


def test_a_choice_spec_lists_arch_first_among_its_params() -> None:
    spec = parse_spec(CHOICE)
    assert spec.archs == ["resnet18", "mobilenet_v3_small", "alexnet"] and spec.arch_searched
    assert list(spec.params) == ["arch", *spec.search]
    assert spec.params["arch"] is spec.model.arch and spec.model.arch.values == spec.archs
    # Its own image size stays unresolved (each architecture has its own); the flip is not.
    assert (spec.data.image_size, spec.data.hflip) == (None, False)
    assert parse_spec(spec_to_yaml(spec)) == spec  # spec.yaml in the run folder reads back
    one = parse_spec(BASE + "model: {arch: resnet18, weights: DEFAULT}\n")
    assert (one.archs, one.arch_searched, one.params) == (["resnet18"], False, {})


@pytest.mark.parametrize("arch, weights, size, kept", [
    ("resnet18", "DEFAULT", 224,  # the weights' crop size
     ["lr", "optimizer", "momentum", "head_dropout", "head_hidden", "freeze_fraction"]),
    ("mobilenet_v3_small", "none", 32,  # digits' natural size: no weights metadata
     ["lr", "optimizer", "momentum", "activation", "activation_scope", "freeze_fraction"]),
    ("alexnet", "w.pth", 32,  # a file has no metadata either; activation_scope goes with
     ["lr", "optimizer", "momentum", "head_dropout", "freeze_fraction"]),  # its parent
])
def test_for_arch_is_the_spec_written_for_that_arch_alone(arch: str, weights: str, size: int,
                                                          kept: list[str]) -> None:
    spec = parse_spec(CHOICE)
    one = spec.for_arch(arch)
    assert (one.model.arch, one.model.weights, one.data.image_size) == (arch, weights, size)
    assert list(one.search) == kept and not one.arch_searched and one.archs == [arch]
    assert all("arch" not in (p.when or {}) for p in one.search.values())
    if "head_hidden" in kept:
        assert one.search["head_hidden"].when == {"optimizer": "adamw"}
    if "head_dropout" in kept:
        assert one.search["head_dropout"].when is None
    # Exactly what the user would have got writing that spec by hand.
    hand = spec.model_dump(mode="json")
    hand["model"].update(arch=arch, weights=weights)
    hand["data"]["image_size"] = None
    hand["search"] = {n: p.model_dump(mode="json") for n, p in one.search.items()}
    assert parse_spec(spec_to_yaml(type(spec).model_validate(hand))) == one
    assert one.for_arch(arch) is one and one.for_trial({"lr": 0.1}) is one
    assert spec.for_trial({"arch": arch, "lr": 0.1}) == one


def test_a_written_image_size_holds_for_every_arch() -> None:
    spec = parse_spec(CHOICE + "data: {image_size: 48}\n")
    assert spec.data.image_size == 48
    assert {spec.for_arch(a).data.image_size for a in spec.archs} == {48}


def test_one_weights_value_applies_to_every_arch() -> None:
    spec = parse_spec(BASE + "model:\n  arch: {space: choice, values: [resnet18, "
                             "efficientnet_b3]}\n  weights: DEFAULT\n")
    assert [spec.model.weights_for(a) for a in spec.archs] == ["DEFAULT", "DEFAULT"]
    assert [spec.for_arch(a).data.image_size for a in spec.archs] == [224, 300]


def test_a_mapping_for_one_arch_is_its_one_value() -> None:
    spec = parse_spec(BASE + "model:\n  arch: resnet18\n  weights: {resnet18: DEFAULT}\n")
    assert spec.model.weights == "DEFAULT" and spec.data.image_size == 224


def test_for_arch_refuses_an_arch_the_spec_does_not_have() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(CHOICE).for_arch("vgg11")
    assert info.value.field == "model.arch" and "allowed: resnet18, mobilenet_v3_small" \
        in str(info.value)
    with pytest.raises(SpecError):
        parse_spec(BASE).for_arch("alexnet")


def test_the_largest_search_and_distillation_with_a_teacher_are_accepted() -> None:
    assert parse_spec(BASE + "run: {num_samples: 100000}\n").run.num_samples == 100_000
    spec = parse_spec(BASE + "model: {teacher: models/t/v1}\nsearch:\n  distill_alpha: 0.3\n"
                      "  distill_temperature: {space: choice, values: [2.0, 8.0]}\n")
    assert set(spec.search) == {"distill_alpha", "distill_temperature"}


def test_promotion_bounds_are_optional_positive_numbers() -> None:
    assert (parse_spec(BASE).promote.max_latency_ms, parse_spec(BASE).promote.max_params) \
        == (None, None)
    p = parse_spec(BASE + "promote: {max_latency_ms: 2.5, max_params: 2000000}\n").promote
    assert (p.max_latency_ms, p.max_params) == (2.5, 2_000_000)


# --------------------------------------------------------------------------------------------
# check_fit: how many trials fit at once, or why none ever would.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resources, cluster, fits", [
    ("{cpu: 1, gpu: 0}", {"CPU": 2.0}, 2),
    ("{cpu: 0.5, gpu: 0}", {"CPU": 2.0, "GPU": 0.0}, 4),
    ("{cpu: 1, gpu: 0.5}", {"CPU": 16.0, "GPU": 1.0}, 2),     # fractional GPUs pack trials
    ("{cpu: 4, gpu: 0.25}", {"CPU": 8.0, "GPU": 2.0}, 2),     # CPUs are the limit
    ("{cpu: 1, gpu: 0.1}", {"CPU": 8.0, "GPU": 0.3}, 3),      # no float rounding loss
    ("{cpu: 1, gpu: 2}", {"CPU": 8.0, "GPU": 4.0}, 2),
])
def test_check_fit_counts_trials_that_fit(resources: str, cluster: dict, fits: int) -> None:
    spec = parse_spec(f"name: t\nrun: {{resources: {resources}}}\n")
    assert check_fit(spec, cluster) == fits


@pytest.mark.parametrize("resources, cluster, words", [
    ("{cpu: 1, gpu: 1}", {"CPU": 2.0}, "1 CPU and 1 GPU, but the cluster has 2 CPU and 0 GPU "
                                       "(it has no GPU"),
    ("{cpu: 1, gpu: 2}", {"CPU": 8.0, "GPU": 1.0}, "allowed: cpu <= 8, gpu <= 1"),
    ("{cpu: 4}", {"CPU": 2.0, "GPU": 1.0}, "4 CPU and 0 GPU, but the cluster has 2 CPU"),
])
def test_check_fit_refuses_what_would_stay_pending(resources: str, cluster: dict,
                                                   words: str) -> None:
    spec = parse_spec(f"name: t\nrun:\n  resources: {resources}\n", file="s.yaml")
    with pytest.raises(SpecError) as info:
        check_fit(spec, cluster)
    assert info.value.field == "run.resources" and words in str(info.value)
    assert "pending forever" in str(info.value)


# -- searcher.portfolio, scheduler.brackets (spec_searcher.py) ------------------------------
@pytest.mark.parametrize("body, field, line, words", [
    ("scheduler:\n  brackets: 0\n", "scheduler.brackets", 3, "greater than or equal to 1"),
    ("scheduler:\n  grace_period: 2\n  brackets: 3\n", "scheduler.brackets", 4,
     "3 brackets, but with grace_period 2, reduction_factor 2 and max_t 4 bracket 1 already "
     "stops nothing before max_t; allowed: 1..2"),
    ("scheduler:\n  brackets: 2\n  grace_period: 4\n", "scheduler.brackets", 3,
     "2 brackets, but one already stops nothing before max_t; allowed: 1 (with grace_period 4, "
     "reduction_factor 2 and max_t 4 there is one rung, at max_t)"),
    ("scheduler:\n  type: none\n  brackets: 2\n", "scheduler.brackets", 4,
     "2 brackets, but brackets only counts with type: asha, and this spec says type: none: it "
     "would do nothing; allowed: 1 (or drop it), or scheduler.type: asha"),
    ("searcher:\n  portfolio: ''\n", "searcher.portfolio", 3, "empty; allowed: builtin, none"),
    ("searcher:\n  portfolio: 3\n", "searcher.portfolio", 3,
     "got 3; allowed: builtin, none, or the path of a portfolio file (YAML or JSON)"),
    ("searcher:\n  portfolio: [a.yaml]\n", "searcher.portfolio", 3,
     "got ['a.yaml']; allowed: builtin, none, or the path of a portfolio file"),
    ("searcher:\n  portfolio: null\n", "searcher.portfolio", 3, "got None; allowed: builtin"),
])
def test_bad_brackets_and_portfolio_names_are_refused(body: str, field: str, line: int,
                                                      words: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(BASE + body, file="t.yaml")
    assert e.value.field == field and e.value.line == line and words in str(e.value)


@pytest.mark.parametrize("sched, top", [
    ("{grace_period: 1}", 3),          # max_t 4: rungs 1, 2 below it; bracket 2 stops nothing
    ("{grace_period: 2}", 2),
    ("{grace_period: 4}", 1),
    ("{grace_period: 1, reduction_factor: 3}", 3),  # rungs 1, 3
    ("{type: none, brackets: 1}", None),  # without ASHA one bracket (the default) is allowed
])
def test_brackets_up_to_one_that_stops_nothing(sched: str, top: int | None) -> None:
    from raytune_ft.spec.searcher import max_brackets

    spec = parse_spec(BASE + f"train: {{max_epochs: 4}}\nscheduler: {sched}\n", file="t.yaml")
    assert spec.searcher.portfolio == "none"  # the schema's default: specs search as before
    if top is None:
        assert spec.scheduler.brackets == 1
        return
    sch = spec.scheduler
    assert sch.brackets == 1 and max_brackets(sch.grace_period, 4, sch.reduction_factor) == top
    most = parse_spec(BASE + f"train: {{max_epochs: 4}}\nscheduler: {sched[:-1]}, "
                             f"brackets: {top}}}\n", file="t.yaml")
    assert most.scheduler.brackets == top
