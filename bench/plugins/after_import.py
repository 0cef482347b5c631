"""The import hook the test and benchmark plugins share: patch a module of rtft right after it
has been imported, without touching rtft's code.

Used by bench/plugins/instant_trainer, tests/plugins/faults and tests/plugins/hold. Each of
them is a `sitecustomize.py` whose folder is put alone on PYTHONPATH, so every Python process
of a search (the driver, and the Ray workers it starts, which inherit the environment) runs it
at start-up; each adds this file's folder to sys.path from its own location and calls
:func:`patch_after_import`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `target` with the normal machinery, executes it, then calls `patch(module)`."""

    def __init__(self, target: str, patch: Callable[[ModuleType], None]) -> None:
        self.target, self.patch = target, patch
        self.spec: Any = None

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.target:
            return None
        sys.meta_path.remove(self)  # find the real module without us
        try:
            self.spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if self.spec is None:
            return None
        return importlib.util.spec_from_loader(name, self, origin=self.spec.origin)

    def create_module(self, spec: Any) -> Any:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        module.__file__ = self.spec.origin
        self.spec.loader.exec_module(module)
        self.patch(module)


def patch_after_import(target: str, patch: Callable[[ModuleType], None]) -> None:
    """Once the module named `target` (e.g. "raytune_ft.search.trainable") has been imported
    and executed, in this process, call `patch(module)` before anyone else sees it."""
    sys.meta_path.insert(0, _PatchAfterImport(target, patch))
