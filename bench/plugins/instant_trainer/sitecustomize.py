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

import importlib.abc
import importlib.util
import math
import os
import sys
import time
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


class _Patch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds TARGET with the normal machinery, then swaps its trainer once it has executed."""

    spec: Any = None

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module without us
        try:
            self.spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        return (importlib.util.spec_from_loader(name, self, origin=self.spec.origin)
                if self.spec else None)

    def create_module(self, spec: Any) -> Any:
        return None

    def exec_module(self, module: Any) -> None:
        module.__file__ = self.spec.origin
        self.spec.loader.exec_module(module)
        module.train = instant_train


if ENV in os.environ:
    sys.meta_path.insert(0, _Patch())
