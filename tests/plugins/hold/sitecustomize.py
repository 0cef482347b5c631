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


if os.environ.get(ENV):
    # The shared import hook (bench/plugins/after_import.py): this folder is alone on PYTHONPATH.
    sys.path.append(str(Path(__file__).resolve().parents[3] / "bench" / "plugins"))
    from after_import import patch_after_import

    def _patch(module: Any, folder: Path = Path(os.environ[ENV]),
               hold_epoch: int = int(os.environ.get("RTFT_TEST_HOLD_EPOCH", "2"))) -> None:
        module.make_report = _wrap(module.make_report, folder, hold_epoch)

    patch_after_import(TARGET, _patch)
