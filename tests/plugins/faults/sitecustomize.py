"""Test-only fault injection for rtft trials, outside the production code.

Put this folder on PYTHONPATH and set RTFT_TEST_FAULTS to a folder: every Python process of
the search (the driver, and the Ray workers it starts, which inherit the environment) runs
this file at start-up. It waits for `raytune_ft.search.trainable` to be imported and wraps its
`make_report` seam. The first trial to start claims the folder, dies after its first
checkpoint, and on its retry finds that checkpoint truncated on disk, as a crash mid-write or a
failing disk leaves it. Used by tests/test_e2e_resume.py.
"""

from __future__ import annotations

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


if os.environ.get(ENV):
    # The shared import hook (bench/plugins/after_import.py): this folder is alone on PYTHONPATH.
    sys.path.append(str(Path(__file__).resolve().parents[3] / "bench" / "plugins"))
    from after_import import patch_after_import

    def _patch(module: Any, folder: Path = Path(os.environ[ENV])) -> None:
        module.make_report = _wrap(module.make_report, folder)

    patch_after_import(TARGET, _patch)
