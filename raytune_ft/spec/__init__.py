"""The search spec: what `rtft search SPEC.yaml` is told to do.

| module     | its one job                                                                   |
|------------|-------------------------------------------------------------------------------|
| `schema`   | the pydantic models of every section, defaults and checks that span fields    |
| `searcher` | the `searcher:` and `scheduler:` sections, ASHA's brackets and rungs as Ray's |
| `yaml_io`  | YAML in (strict, with line numbers, `--set`) and out; errors as one line      |

The knobs a trial is trained with and the `search:` parameter types are
:mod:`raytune_ft.knobs`, shared with the trainer. Import the modules, not this package: it
exports nothing of its own.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

# Run folders written by rtft 0.1.0 hold a pickled Tuner and searcher (Ray's `Tuner.restore`
# loads them on `rtft resume`) that name the spec's classes where 0.1.0 defined them: the
# schema and the search-parameter types as `raytune_ft.spec.<Name>` (spec.py was one module),
# the `searcher:`/`scheduler:` sections as `raytune_ft.spec_searcher.<Name>`. Those names
# resolve here, to today's classes; nothing else is served.
_PICKLED_BY_0_1 = {
    **{name: "raytune_ft.spec.schema" for name in (
        "Spec", "ModelSpec", "DataSpec", "TrainSpec", "RunSpec", "Resources", "PromoteSpec")},
    **{name: "raytune_ft.knobs" for name in (
        "Hyperparams", "Fixed", "Uniform", "LogUniform", "IntRange", "Choice")},
    **{name: "raytune_ft.spec.searcher" for name in ("SearcherSpec", "SchedulerSpec")},
}
_MODULES_OF_0_1 = {"raytune_ft.spec_searcher": "raytune_ft.spec.searcher"}


def __getattr__(name: str) -> Any:
    if name in _PICKLED_BY_0_1:
        return getattr(importlib.import_module(_PICKLED_BY_0_1[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import raytune_ft.spec_searcher` (what unpickling a 0.1.0 spec does) is today's
    module. Installed when this package is first imported, which unpickling such a spec does
    first (its `Spec` class is named before the sections it holds)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name in _MODULES_OF_0_1 else None

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(_MODULES_OF_0_1[spec.name])
        self._own_spec = module.__spec__  # the import system is about to overwrite it
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self._own_spec  # reload() and tools still find the real module


if not any(isinstance(f, _MovedModule) for f in sys.meta_path):
    sys.meta_path.append(_MovedModule())
