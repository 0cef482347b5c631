"""The installed Ray still has every private attribute rtft uses (search/ray_private.py)."""

from __future__ import annotations

import importlib

import pytest
import ray

from raytune_ft.search import ray_private

FILE = "raytune_ft/search/ray_private.py"


def _instance(cls: type) -> object:
    """An instance of `cls` built as Ray builds it, for attributes set in __init__."""
    name = cls.__name__
    if name == "AsyncHyperBandScheduler":
        return cls(time_attr="training_iteration", metric="m", mode="max", max_t=4)
    if name == "_Bracket":
        return cls(1, 4, 2, 0)
    if name == "TBXLoggerCallback":
        return cls()
    if name == "OptunaSearch":
        def space(trial: object) -> None:
            trial.suggest_float("x", 0.0, 1.0)  # type: ignore[attr-defined]

        return cls(space=space, metric="m", mode="max")
    if name == "_ExperimentCheckpointManager":
        return cls(storage=None, checkpoint_period="auto")
    return None


@pytest.mark.parametrize("path, attr, where", ray_private.USED,
                         ids=[f"{p.rsplit('.', 1)[1]}.{a}" for p, a, _ in ray_private.USED])
def test_installed_ray_has_the_private_state_we_use(path: str, attr: str, where: str) -> None:
    module, name = path.rsplit(".", 1)
    hint = (f"Ray {ray.__version__} changed {path}.{attr}, which rtft uses (checked against "
            f"Ray {', '.join(ray_private.CHECKED_RAY)}): update {FILE} and the Ray pin in "
            f"pyproject.toml")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.fail(hint)
    if where == "class":
        assert hasattr(cls, attr), hint
        return
    if where == "init" or name == "TuneController":  # too heavy to build: set in __init__
        import inspect

        assert f"self.{attr}" in inspect.getsource(cls.__init__), hint
        return
    obj = _instance(cls)
    assert obj is not None and hasattr(obj, attr), hint


def test_the_pinned_ray_is_one_we_checked() -> None:
    major_minor = ".".join(ray.__version__.split(".")[:2])
    assert major_minor in ray_private.CHECKED_RAY, (
        f"Ray {ray.__version__} is installed; {FILE} was checked against "
        f"{ray_private.CHECKED_RAY}: run this file's tests, then add the version there")
