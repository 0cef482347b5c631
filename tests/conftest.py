"""Shared fixtures only: one real embedded Ray per session, a private rtft cache, a backbone
file, default hyperparameters. Plain helpers (tiny specs, ROOT, free ports) are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raytune_ft.knobs import Hyperparams


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that starts a multi-node cluster is slow too: `pytest -m "not slow"` (the fast
    # loop) leaves it out without having to name `cluster` as well.
    for item in items:
        if item.get_closest_marker("cluster") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Never touch the user's ~/.cache/rtft from tests, nor torch's hub cache (a test puts
    # stand-in torchvision weights there); set before Ray starts, so its workers see them too.
    os.environ["RTFT_CACHE"] = str(tmp_path_factory.mktemp("rtft-cache"))
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch-home"))
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


@pytest.fixture
def hp() -> Hyperparams:
    return Hyperparams(batch_size=32, augment="none")
