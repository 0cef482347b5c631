"""Test-only: hold a search still while a test looks at it from outside, without touching the
production code.

Put this folder on PYTHONPATH and set RTFT_TEST_HOLD to a folder: every Python process of the
search (the driver, and the Ray workers it starts, which inherit the environment) runs this
file at start-up. It waits for `raytune_ft.search.trainable` to be imported and wraps its
`make_report` seam so that each epoch's report

- prints `rtft-test: trial <id> epoch <n>` from the trial's worker (a line the driver shows
  under the worker's log prefix, so the test can match prefix and trial), then reports;
- for the first trial to reach epoch RTFT_TEST_HOLD_EPOCH (default 2), before reporting it:
  writes `held` (its trial id) in the folder and waits until the test writes `release` there.
  Held before its report, the trial gives ASHA nothing to stop it on: it stays running, the
  search goes on around it until every other trial has ended, and every process of the search
  stays up. Used by tests/test_e2e_dashboard.py.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

ENV = "RTFT_TEST_HOLD"
TARGET = "raytune_ft.search.trainable"


def _claim(path: Path, trial_id: str) -> bool:
    """True for the one trial that creates `path`, holding its id: written aside, then linked
    into place (atomic, and refused when the name exists), so a reader never sees it empty."""
    mine = path.with_name(f"{path.name}-{trial_id}")
    mine.write_text(trial_id)
    try:
        os.link(mine, path)
    except FileExistsError:
        return False
    return True


def _wrap(make_report: Any, folder: Path, hold_epoch: int) -> Any:
    def holding_make_report(checkpoint: Any) -> Any:
        from ray import tune

        report = make_report(checkpoint)
        trial_id = tune.get_context().get_trial_id()

        def hold_and_report(metrics: dict[str, Any], ckpt: Path | None) -> None:
            print(f"rtft-test: trial {trial_id} epoch {metrics['epoch']}", flush=True)
            if metrics["epoch"] == hold_epoch and _claim(folder / "held", trial_id):
                while not (folder / "release").exists():  # the test's signal, on disk
                    time.sleep(0.2)
            report(metrics, ckpt)

        return hold_and_report

    return holding_make_report


class _Patch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds TARGET with the normal machinery, then wraps its seam once it has executed."""

    def __init__(self, folder: Path, hold_epoch: int) -> None:
        self.folder, self.hold_epoch = folder, hold_epoch
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
        module.make_report = _wrap(module.make_report, self.folder, self.hold_epoch)


if os.environ.get(ENV):
    sys.meta_path.insert(0, _Patch(Path(os.environ[ENV]),
                                   int(os.environ.get("RTFT_TEST_HOLD_EPOCH", "2"))))
