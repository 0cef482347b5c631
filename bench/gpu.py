"""The GPU path: images/s per trial, GPU utilisation, and trials packed on one GPU.

    python bench/gpu.py            # 1, 2 and 4 trials on one GPU (resources gpu 1 / 0.5 / 0.25)
    python bench/gpu.py --smoke    # seconds: 1 and 2 trials, 1 epoch

Runs the default task through ``run_search`` (every parameter fixed to the default fine-tune,
scheduler none, no pretrained weights: throughput does not depend on them) at a larger image
size, with k trials at once sharing one GPU (``run.resources.gpu = 1/k``), k = 1, 2, 4, each
setting repeated. Per trial: the median of its epochs' ``images_per_s`` after the first
(cudnn.benchmark and allocation warm-up); total: the sum over the k concurrent trials. GPU
utilisation is sampled every 0.5 s with ``nvidia-smi`` (or ``torch.cuda.utilization``) while the
trials train. Packing pays while the total grows; the table says where it stops.

Without CUDA it prints that and writes ``bench/results/gpu.json`` with ``skipped``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_SPEC, RESULTS, Results, median, table  # noqa: E402


class UtilSampler:
    """Samples GPU utilisation (%) and memory (MiB) in a background thread."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.samples = every_s, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> tuple[float, float] | None:
        if shutil.which("nvidia-smi"):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                util, mem = out.stdout.strip().splitlines()[0].split(",")
                return float(util), float(mem)
        import torch

        try:
            return float(torch.cuda.utilization()), float("nan")
        except Exception:  # no pynvml: nothing to sample
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self._read()
            if got is not None:
                self.samples.append(got)
            self._stop.wait(self.every_s)

    def __enter__(self) -> UtilSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        busy = [u for u, _ in self.samples if u > 0] or [0.0]
        return {"util_median": median(busy), "util_max": max(busy),
                "mem_max_mib": max((m for _, m in self.samples), default=float("nan")),
                "samples": len(self.samples)}


def packed_run(k: int, image_size: int, epochs: int, batch: int, root: Path) -> dict[str, Any]:
    """k trials sharing one GPU through run_search; per-trial and total images/s."""
    from raytune_ft.search.run import run_search
    from raytune_ft.space import baseline_params
    from raytune_ft.spec.schema import Spec
    from raytune_ft.spec.yaml_io import load_spec

    spec = load_spec(DEFAULT_SPEC, [
        f"name=gpu-pack-{k}", f"data.image_size={image_size}", "data.train_limit=null",
        "model.weights=none", f"train.max_epochs={epochs}", "train.device=cuda",
        "scheduler.type=none", "scheduler.brackets=1", f"run.num_samples={k}",
        f"run.max_concurrent_trials={k}",
        f"run.resources.gpu={1 / k}", "run.resources.cpu=1",
        f"run.storage_path={root}/runs", f"promote.dir={root}/models"])
    values = {n: p.value for n, p in spec.search.items() if p.space == "fixed"}
    values.update(baseline_params(spec))
    values["batch_size"] = batch
    data = spec.model_dump(mode="json")
    data["search"] = {n: {"space": "fixed", "value": v} for n, v in values.items()}
    spec = Spec.model_validate(data)
    t0 = time.perf_counter()
    with UtilSampler() as util:
        outcome = run_search(spec, echo=lambda line: None, quiet=True)
    wall = time.perf_counter() - t0
    per_trial = []
    for r in outcome.records:
        speeds = [h["images_per_s"] for h in r.history if h.get("images_per_s")]
        per_trial.append(median(speeds[1:] or speeds))
    return {"trials": k, "gpu_per_trial": 1 / k, "per_trial_img_s": per_trial,
            "per_trial_median": median(per_trial), "total_img_s": sum(per_trial),
            "wall_s": wall, **util.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="1 and 2 trials, 1 epoch: seconds")
    ap.add_argument("--packing", default="1,2,4", help="trials per GPU to try")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="results folder (default bench/results)")
    args = ap.parse_args()
    import torch

    res = Results("gpu", smoke=args.smoke, out_dir=Path(args.out) if args.out else RESULTS)
    if not torch.cuda.is_available():
        print("no CUDA device on this machine: the GPU benchmark is skipped")
        path = res.write(skipped="no CUDA device")
        print(f"wrote {path}")
        return
    packing = [int(k) for k in args.packing.split(",")]
    if args.smoke:
        packing, args.epochs, args.repeats, args.image_size = [1, 2], 2, 1, 32
    rows, runs = [], {}
    with tempfile.TemporaryDirectory(prefix="rtft-gpu-") as tmp:
        for k in packing:
            reps = [packed_run(k, args.image_size, args.epochs, args.batch_size,
                               Path(tmp) / f"{k}-{r}") for r in range(args.repeats)]
            runs[k] = reps
            print(f"{k} trial(s) per GPU: total {median([x['total_img_s'] for x in reps]):.0f} "
                  f"img/s", flush=True)
    base = median([x["total_img_s"] for x in runs[packing[0]]])
    summary = {}
    for k, reps in runs.items():
        total = median([x["total_img_s"] for x in reps])
        summary[k] = {"per_trial_img_s": median([x["per_trial_median"] for x in reps]),
                      "total_img_s": total, "speedup_vs_1": total / base,
                      "gpu_util_median": median([x["util_median"] for x in reps]),
                      "gpu_mem_max_mib": max(x["mem_max_mib"] for x in reps)}
        s = summary[k]
        rows.append([k, f"{1 / k:g}", s["per_trial_img_s"], s["total_img_s"], s["speedup_vs_1"],
                     s["gpu_util_median"], s["gpu_mem_max_mib"]])
    print(f"\n{torch.cuda.get_device_name()}, resnet18 at {args.image_size} px, batch "
          f"{args.batch_size}, median of {args.repeats}")
    print(table(["trials", "gpu each", "img/s per trial", "total img/s", "vs 1 trial",
                 "GPU util %", "GPU mem MiB"], rows))
    path = res.write(settings=vars(args), summary=summary, runs=runs)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
