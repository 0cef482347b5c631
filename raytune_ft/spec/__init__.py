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
from typing import Any

# Run folders written by rtft 0.1.0 (when the schema was one module, spec.py, and the search
# parameter types lived in it) hold a pickled searcher naming `raytune_ft.spec.LogUniform`
# and its siblings: Ray's `Tuner.restore` finds them here. Nothing else is served.
_PICKLED_BY_0_1 = {name: "raytune_ft.knobs" for name in (
    "SearchParam", "Fixed", "Uniform", "LogUniform", "IntRange", "Choice")}


def __getattr__(name: str) -> Any:
    if name in _PICKLED_BY_0_1:
        return getattr(importlib.import_module(_PICKLED_BY_0_1[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
