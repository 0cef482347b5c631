"""raytune-ft: hyperparameter search for fine-tuning pretrained image models on Ray Tune.

The Python API (:mod:`raytune_ft.api`), loaded on first use, so that `import raytune_ft`
imports neither torch, Ray nor pandas::

    import raytune_ft as rtft
    result = rtft.search("search_spaces/resnet.yaml", overrides=["run.num_samples=6"])
    result.trials, result.best, result.promoted
    rtft.validate(spec), rtft.load_spec(spec), rtft.results(run_dir), rtft.promote(run_dir)
    rtft.load_promoted("models/resnet18-digits/v1")

Two of these names are also modules of the package: the subpackage `raytune_ft/search/` and
`raytune_ft/promote.py`. `raytune_ft.search` and `raytune_ft.promote` are the API's functions
when called and the modules for any attribute (`raytune_ft.search.run`,
`from raytune_ft import promote as P; P.load_promoted`), whatever was imported before.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["SearchResult", "Validation", "load_promoted", "load_spec", "promote", "results",
           "search", "validate"]

if TYPE_CHECKING:
    from raytune_ft.api import (  # noqa: F401
        SearchResult,
        Validation,
        load_spec,
        promote,
        results,
        search,
        validate,
    )
    from raytune_ft.promote import PromotedModel

_API = {"SearchResult", "Validation", "load_spec", "results", "validate"}


def load_promoted(path: Any, *, verify: bool = True) -> PromotedModel:
    """Load a promoted model folder (see :func:`raytune_ft.promote.load_promoted`)."""
    from raytune_ft.promote import load_promoted as _load

    return _load(path, verify=verify)


def __getattr__(name: str) -> Any:
    # raytune_ft.api by name: an import statement would make this package import (at function
    # level) the whole search, which imports this package for its version (search/cluster).
    if name in _API:
        return getattr(importlib.import_module("raytune_ft.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _FunctionAndModule:
    """`raytune_ft.search` / `raytune_ft.promote`: the API's function when called, the module
    of that name for every attribute (read or set). Python sets a submodule as an attribute of
    its package once imported, which would hide the function after the first search: the
    package's class below keeps this object there instead."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _function(self) -> Any:
        return getattr(importlib.import_module("raytune_ft.api"), self._name)

    def _module(self) -> types.ModuleType:
        return importlib.import_module(f"raytune_ft.{self._name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr == "_name":  # not set yet (a copy being built): no module to ask
            raise AttributeError(attr)
        return getattr(self._module(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._module(), attr, value)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]  # help(), `?` in Jupyter
        return self._function().__doc__

    @property
    def __wrapped__(self) -> Any:  # inspect.signature(raytune_ft.search): the function's
        return self._function()

    def __repr__(self) -> str:
        return (f"<function raytune_ft.{self._name} (raytune_ft.api.{self._name}); its "
                f"attributes are the module raytune_ft.{self._name}'s>")


_search = _FunctionAndModule("search")
_promote = _FunctionAndModule("promote")


class _Package(types.ModuleType):
    # Data descriptors: they win over the submodule the import system sets on the package.
    search = property(lambda self: _search, lambda self, value: None)
    promote = property(lambda self: _promote, lambda self, value: None)


sys.modules[__name__].__class__ = _Package
