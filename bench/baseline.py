"""Does the search beat doing nothing? Baselines on the same data and split as a spec.

    python bench/baseline.py search_spaces/resnet.yaml [--promoted models/resnet18-digits/v1]

Trains, with the plain trainer and no search:
  head-only  the spec's pretrained backbone frozen, a new linear head at the default LR
             (AdamW 1e-3), for train.max_epochs epochs — "doing nothing";
  fine-tune  the same backbone, everything trainable, default knobs;
  scratch    no pretrained weights, default knobs;
and scores each once on the held-out test split, next to the promoted model's test accuracy.
Writes bench/results/baseline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from raytune_ft.data import prepare
from raytune_ft.knobs import Hyperparams
from raytune_ft.model.pretrain import ensure_backbone
from raytune_ft.spec.yaml_io import load_spec
from raytune_ft.train import evaluate, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--promoted", help="a promoted model folder to compare against")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    spec = load_spec(args.spec)
    ensure_backbone(spec)
    data = prepare(spec.data)
    runs = {
        "head-only": (spec, Hyperparams(freeze_depth=64)),
        "fine-tune": (spec, Hyperparams()),
        "scratch": (spec.model_copy(update={"model": spec.model.model_copy(
            update={"weights": "none"})}), Hyperparams()),
    }
    rows = []
    for name, (s, hp) in runs.items():
        t0 = time.perf_counter()
        res = train(hp, spec=s, data=data, report=lambda m, c: None, checkpoints=False,
                    num_threads=args.threads)
        _, acc = evaluate(res.model, data.test_x, data.test_y)
        rows.append({"run": name, "test_acc": acc, "seconds": time.perf_counter() - t0})
    if args.promoted:
        m = json.loads((Path(args.promoted) / "metrics.json").read_text())
        rows.append({"run": f"rtft search (trial {m['trial_id']})", "test_acc": m["test"]["acc"],
                     "seconds": None})
    print(f"{'run':<28} {'test acc':>9} {'seconds':>8}")
    for r in rows:
        secs = f"{r['seconds']:8.1f}" if r["seconds"] is not None else f"{'-':>8}"
        print(f"{r['run']:<28} {r['test_acc']:9.4f} {secs}")
    out = Path(__file__).parent / "results" / "baseline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"spec": args.spec, "rows": rows, "machine": {
        "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}, indent=1))


if __name__ == "__main__":
    main()
