"""Live: the default search against random search at the same budget, on a task none of the
portfolio's pools saw, each `rtft search` in a fresh process as a user runs it.

Arms, same trials (`run.num_samples` of search_spaces/resnet.yaml) and epochs per trial:
(a) `rtft default`: the shipped spec as it is (built-in portfolio, TPE, hedged ASHA, the
baseline first); (b) `random full`: random sampling, no early stopping, no portfolio, no
baseline trial, what a user would run instead. Reported: the held-out test accuracy of the
model each promotes, its best val_acc, epochs trained, wall seconds.

Tasks (`--tasks`): `mnist-scratch` (MNIST digits, 500 training images, no pretraining: a data
set none of the pools holds, from scratch) and `mnist-64` (MNIST at 64 px from the rtft:mnist
backbone, which was pretrained on MNIST: an unseen input size, not an unseen data set).

    python bench/live_default.py --tasks mnist-scratch --seeds 0 1
    python bench/live_default.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_SPEC, SMOKE_OVERRIDES, Results, out_dir_arg, table  # noqa: E402
from which_model import _ensure_backbones, _search, _spec, _write  # noqa: E402

TASKS = {
    "mnist-scratch": ["data.source=mnist", "model.weights=none"],
    "mnist-64": ["data.source=mnist", "data.image_size=64"],
}
ARMS = {
    "rtft default": [],
    "random full": ["searcher.sampler=random", "scheduler.type=none", "scheduler.brackets=1",
                    "searcher.portfolio=none", "searcher.baseline_first=false"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["mnist-scratch"], choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny task, 3 trials")
    ap.add_argument("--out", help="results folder (default bench/results)")
    args = ap.parse_args()
    res = Results("live_default", smoke=args.smoke, out_dir=out_dir_arg(args.out))
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="rtft-live-") as tmp:
        for task in args.tasks:
            extra = [*TASKS[task], *(SMOKE_OVERRIDES + ["run.num_samples=3"]
                                     if args.smoke else [])]
            for seed in args.seeds:
                for arm, sets in ARMS.items():
                    spec = _spec(DEFAULT_SPEC, [*extra, *sets])
                    _ensure_backbones(spec)
                    folder = Path(tmp) / f"{task}-{seed}-{arm.replace(' ', '-')}"
                    folder.mkdir()
                    name = f"live-{arm.split()[0]}"
                    t0 = time.monotonic()
                    got = _search(_write(spec, folder, name, spec.run.num_samples, seed),
                                  folder)
                    print(f"{task} seed {seed} {arm}: test acc {got['test_acc']:.4f} "
                          f"({time.monotonic() - t0:.0f} s)", flush=True)
                    runs.append({"task": task, "seed": seed, "arm": arm, **got})
                    rows.append([task, seed, arm, got["test_acc"], got["best_val_acc"],
                                 got["epochs"], got["wall_s"]])
    print(table(["task", "seed", "arm", "test acc", "best val_acc", "epochs", "wall s"], rows))
    wins = {}
    for task in args.tasks:
        for seed in args.seeds:
            by = {r["arm"]: r["test_acc"] for r in runs if r["task"] == task
                  and r["seed"] == seed}
            wins[f"{task}/{seed}"] = by["rtft default"] >= by["random full"]
    print(f"rtft default's test accuracy ≥ random full's: {sum(wins.values())}/{len(wins)}")
    print(f"wrote {res.write(runs=runs, default_at_least_random=wins)}")


if __name__ == "__main__":
    main()
