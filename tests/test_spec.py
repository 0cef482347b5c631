"""The spec schema (spec.py): bad specs are refused naming file, field, line and what is
allowed; defaults resolved; a light import; check_fit, the resources a trial needs against what
the machines have."""

from __future__ import annotations

import pytest
from helpers import BASE

from raytune_ft.errors import SpecError
from raytune_ft.spec import check_fit
from raytune_ft.spec_io import parse_spec, spec_to_yaml

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


def test_knobs_are_the_same_objects_through_spec() -> None:
    from raytune_ft import knobs, spec

    assert spec.Hyperparams is knobs.Hyperparams and spec.param_order is knobs.param_order
    assert spec.ACTIVATIONS == ("relu", "gelu", "silu", "leaky_relu", "elu", "mish", "tanh",
                                "sigmoid")
    assert spec.INITS[0] == "default" and "trunc_normal" in spec.INITS



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
