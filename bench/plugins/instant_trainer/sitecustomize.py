"""Benchmark-only: replace rtft's trainer with one that trains nothing, in every process of a
search. Used by `bench/load.py --bookkeeping`, never by rtft itself.

`bench/load.py` puts this folder on PYTHONPATH and sets RTFT_BENCH_INSTANT="SECONDS" before it
starts the search: every Python process (the driver, and the Ray workers it starts, which
inherit the environment) runs this file at start-up. Once `raytune_ft.search.trainable` has
been imported, its `train` becomes :func:`instant_train`, which reports every epoch after
sleeping SECONDS (0: at once), with a val_acc that depends on the trial's parameters so that
Optuna and ASHA have something to tell apart. Everything around the trainer (Tune, the
searcher, ASHA's log, the callbacks, the snapshots, the driver) is rtft's own.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ENV = "RTFT_BENCH_INSTANT"
TARGET = "raytune_ft.search.trainable"


def instant_train(hp: Any, *, spec: Any, report: Any, **_: Any) -> None:
    """Report `spec.train.max_epochs` epochs, each after `$RTFT_BENCH_INSTANT` seconds."""
    sleep = float(os.environ.get(ENV) or 0)
    quality = math.exp(-abs(math.log10(hp.lr) + 2.5))  # best near lr = 3e-3
    best = 0.0
    for epoch in range(1, spec.train.max_epochs + 1):
        if sleep:
            time.sleep(sleep)
        acc = quality * (1 - 0.5 / epoch)
        best = max(best, acc)
        report({"epoch": epoch, "train_loss": 1 - acc, "val_loss": 1 - acc, "val_acc": acc,
                f"best_{spec.metric}": best if spec.metric == "val_acc" else 1 - best,
                "lr": hp.lr, "images_per_s": 0.0, "diverged": False}, None)


def _patch(module: Any) -> None:
    module.train = instant_train


if ENV in os.environ:
    # The shared import hook (../after_import.py): this folder is alone on PYTHONPATH.
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from after_import import patch_after_import

    patch_after_import(TARGET, _patch)
