"""Shared fixtures: one real embedded Ray per session, a private rtft cache, tiny specs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raytune_ft.spec import Hyperparams, Spec
from raytune_ft.spec_io import parse_spec

TINY_SPEC = """\
name: tiny
model: {{arch: resnet18, weights: {weights}}}
data: {{source: digits, image_size: 16, train_limit: 160, val_fraction: 0.15, test_fraction: 0.15}}
train: {{max_epochs: 2, seed: 0}}
search:
  lr: {{space: loguniform, low: 1.0e-3, high: 1.0e-2}}
  optimizer: {{space: choice, values: [sgd, adamw]}}
  momentum: {{space: uniform, low: 0.8, high: 0.95, when: {{optimizer: sgd}}}}
  freeze_depth: {{space: int, low: 0, high: 2}}
  batch_size: 32
  augment: none
searcher: {{sampler: tpe, seed: 0, n_startup_trials: 2}}
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
run: {{num_samples: {n}, max_concurrent_trials: 2, storage_path: {root}/runs}}
promote: {{dir: {root}/models}}
"""


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Never touch the user's ~/.cache/rtft from tests.
    os.environ["RTFT_CACHE"] = str(tmp_path_factory.mktemp("rtft-cache"))
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, started once and always shut down."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-format resnet18 state dict on disk (1000-class head), as a user has."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def tiny_spec(root: Path, *, n: int = 4, weights: str = "none", extra: str = "") -> Spec:
    return parse_spec(TINY_SPEC.format(root=root, n=n, weights=weights) + extra,
                      file="tiny.yaml")


def write_tiny_spec(root: Path, **kw: object) -> Path:
    path = root / "tiny.yaml"
    path.write_text(TINY_SPEC.format(root=root, n=kw.get("n", 4),
                                     weights=kw.get("weights", "none")) + str(kw.get("extra", "")))
    return path


@pytest.fixture
def hp() -> Hyperparams:
    return Hyperparams(batch_size=32, augment="none")
