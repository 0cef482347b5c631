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

    def __dir__(self) -> list[str]:  # tab completion: the module's names
        return sorted({*dir(self._module()), "__call__"})

    def __reduce__(self) -> tuple[Any, tuple[str]]:  # pickle, copy: the same object back
        return _lookup, (self._name,)


_PROXIES = {"search": _FunctionAndModule("search"), "promote": _FunctionAndModule("promote")}
_OVERRIDES: dict[str, Any] = {}  # raytune_ft.search = fake (a test's monkeypatch, mock.patch)


def _lookup(name: str) -> Any:
    return _PROXIES[name]


def _name_property(name: str) -> property:
    """The package's attribute `name`: the proxy, unless something else was assigned to it.
    The import system assigning the submodule itself is ignored (that is what would hide the
    function); any other value is kept until deleted, as for a plain attribute."""

    def setter(self: types.ModuleType, value: Any) -> None:
        if not (isinstance(value, types.ModuleType) and value.__name__ == f"raytune_ft.{name}"):
            _OVERRIDES[name] = value

    return property(lambda self: _OVERRIDES.get(name, _PROXIES[name]), setter,
                    lambda self: _OVERRIDES.pop(name, None))


class _Package(types.ModuleType):
    # Data descriptors: they win over the submodule the import system sets on the package.
    search = _name_property("search")
    promote = _name_property("promote")


sys.modules[__name__].__class__ = _Package
