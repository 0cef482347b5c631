"""Test-only fault injection for rtft trials, outside the production code.

Put this folder on PYTHONPATH and set RTFT_TEST_FAULTS to a folder: every Python process of
the search (the driver, and the Ray workers it starts, which inherit the environment) runs
this file at start-up. It waits for `raytune_ft.search.trainable` to be imported and wraps its
`make_report` seam. The first trial to start claims the folder, dies after its first
checkpoint, and on its retry finds that checkpoint truncated on disk, as a crash mid-write or a
failing disk leaves it. Used by tests/test_e2e_resume.py.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

ENV = "RTFT_TEST_FAULTS"
TARGET = "raytune_ft.search.trainable"


def _wrap(make_report: Any, folder: Path) -> Any:
    def faulty_make_report(checkpoint: Any) -> Any:
        from ray import tune

        report = make_report(checkpoint)
        trial_id = tune.get_context().get_trial_id()
        claim = folder / "victim"
        if checkpoint is None:
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return report  # another trial is the victim
            os.write(fd, trial_id.encode())
            os.close(fd)

            def crash_after(metrics: dict[str, Any], ckpt: Path | None) -> None:
                report(metrics, ckpt)
                raise RuntimeError(f"injected crash after epoch {metrics['epoch']} ({ENV})")

            return crash_after
        if claim.exists() and claim.read_text() == trial_id:  # the retry: truncate its resume
            state = Path(checkpoint.path) / "state.pt"
            with open(state, "r+b") as f:
                f.truncate(state.stat().st_size // 2)
        return report

    return faulty_make_report


class _Patch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds TARGET with the normal machinery, then wraps its seam once it has executed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.spec: Any = None

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
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
        return None

    def exec_module(self, module: Any) -> None:
        module.__file__ = self.spec.origin
        self.spec.loader.exec_module(module)
        module.make_report = _wrap(module.make_report, self.folder)


if os.environ.get(ENV):
    sys.meta_path.insert(0, _Patch(Path(os.environ[ENV])))
