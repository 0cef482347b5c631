"""Trainer throughput: our train() against a minimal hand-written PyTorch loop.

    python bench/trainer.py            # default task, 1 thread (a trial's setting), 3 repeats
    python bench/trainer.py --smoke    # seconds: 16 px digits, once

CPU: images/s in the training phase of an epoch (what train() reports as `images_per_s`),
train() against a hand-written loop with the same model (built by the same code, the same
pretrained weights and head), batch size, data (uint8 tensors in memory; the hand loop even
normalises them once up front), optimiser (AdamW) and threads, with no schedule, no logging,
no evaluation. Both run 2 epochs per repeat and the second epoch is compared (the first pays
one-off allocations); augmentation is off in both (`augment: none`), so the ratio is the cost
of the trainer's own machinery. Also: the time to save one epoch's checkpoint (model +
optimizer + schedule, exactly what train() writes) and its share of the epoch.

GPU (only when CUDA is present; recorded as skipped otherwise): the same comparison at a larger
image size against the naive loop (fp32, contiguous layout, batches copied from the CPU,
no cudnn.benchmark), and against the same loop with rtft's settings (bf16 AMP, channels_last,
data on the device, cudnn.benchmark).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from _common import (  # noqa: E402
    DEFAULT_SPEC,
    RESULTS,
    SMOKE_OVERRIDES,
    Results,
    median,
    table,
)

from raytune_ft.checkpoint import save_checkpoint  # noqa: E402
from raytune_ft.data import normalize, prepare  # noqa: E402
from raytune_ft.knobs import Hyperparams  # noqa: E402
from raytune_ft.model.build import build_model, resolve_weights  # noqa: E402
from raytune_ft.model.pretrain import ensure_backbone  # noqa: E402
from raytune_ft.spec.schema import Spec  # noqa: E402
from raytune_ft.spec.yaml_io import load_spec  # noqa: E402
from raytune_ft.train import evaluate, pick_device, train  # noqa: E402

TARGET = 0.95


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hand_loop(spec: Spec, data: Any, hp: Hyperparams, device: torch.device, epochs: int, *,
              fast: bool, evaluate_each_epoch: bool = False) -> list[float]:
    """A minimal fine-tuning loop; images/s of each epoch's training phase.

    fast=False on GPU: the naive loop (fp32, batches copied from the CPU each step).
    fast=True: data on the device, and on GPU bf16 autocast, channels_last, cudnn.benchmark.
    """
    torch.manual_seed(spec.train.seed)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda and fast
    weights = resolve_weights(spec.model.weights, spec.model.arch, spec.data.image_size)
    model = build_model(spec.model, data.num_classes, hp, weights).model.to(device)
    if cuda and fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    x = normalize(data.train_x)  # once, up front: less work per step than train() does
    y = data.train_y
    if fast or not cuda:
        x, y = x.to(device), y.to(device)
    if cuda and fast:
        x = x.contiguous(memory_format=torch.channels_last)
    n, bs = len(y), min(hp.batch_size, len(y))
    steps = n // bs
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and fast else nullcontext()
    out = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        _sync(device)
        t0 = time.perf_counter()
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            with amp:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()
        _sync(device)
        out.append(steps * bs / (time.perf_counter() - t0))
        if evaluate_each_epoch:  # as train() does; outside the images/s window
            evaluate(model, data.val_x, data.val_y)
            model.train()
    return out


def rtft_train(spec: Spec, data: Any, hp: Hyperparams, threads: int) -> list[dict[str, Any]]:
    """train() as a trial runs it (no checkpoints); its per-epoch metrics."""
    seen: list[dict[str, Any]] = []
    train(hp, spec=spec, data=data, report=lambda m, c: seen.append(m), num_threads=threads,
          checkpoints=False)
    return seen


def checkpoint_cost(spec: Spec, data: Any, hp: Hyperparams, repeats: int) -> dict[str, float]:
    """Seconds to write one epoch's checkpoint as train() does, and its size."""
    weights = resolve_weights(spec.model.weights, spec.model.arch, spec.data.image_size)
    model = build_model(spec.model, data.num_classes, hp, weights).model
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = normalize(data.train_x[:8])
    F.cross_entropy(model(x), data.train_y[:8]).backward()
    opt.step()  # optimizer state allocated, as after the first step
    times, size = [], 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="rtft-bench-ckpt-") as tmp:
            t0 = time.perf_counter()
            save_checkpoint(tmp, model=model.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), epoch=1, best=0.5,
                            config={"bench": True})
            times.append(time.perf_counter() - t0)
            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return {"save_s": median(times), "size_mb": size / 2**20}


def cpu_section(spec: Spec, data: Any, repeats: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    hp = Hyperparams(**{**spec_hparams(spec), "augment": "none"})
    cpu = torch.device("cpu")
    spec_cpu = spec.model_copy(update={"train": spec.train.model_copy(
        update={"device": "cpu", "max_epochs": 2})})
    reps = []
    for r in range(repeats):
        # Alternate which goes first: drift in the machine's load hits both alike.
        first_ours = r % 2 == 0
        got: dict[str, Any] = {}
        for which in (("ours", "hand") if first_ours else ("hand", "ours")):
            # CPU time of the whole 2-epoch run (model build, training, evaluation) too: on a
            # shared machine wall-clock images/s follow the neighbours' load, CPU time does not.
            c0 = time.process_time()
            if which == "ours":
                m = rtft_train(spec_cpu, data, hp, threads)
                got["ours"] = m[-1]["images_per_s"]
            else:
                got["hand"] = hand_loop(spec_cpu, data, hp, cpu, 2, fast=True,
                                        evaluate_each_epoch=True)[-1]
            got[which + "_cpu_s"] = time.process_time() - c0
        reps.append(got)
        print(f"repeat {r + 1}/{repeats}: train() {got['ours']:.0f} img/s, "
              f"{got['ours_cpu_s']:.1f} CPU s; hand loop {got['hand']:.0f} img/s, "
              f"{got['hand_cpu_s']:.1f} CPU s", flush=True)
    ours = median([g["ours"] for g in reps])
    hand = median([g["hand"] for g in reps])
    ratio = median([g["ours"] / g["hand"] for g in reps])
    cpu_ratio = median([g["hand_cpu_s"] / g["ours_cpu_s"] for g in reps])
    ck = checkpoint_cost(spec, data, hp, repeats)
    n = len(data.train_y) // min(hp.batch_size, len(data.train_y)) * hp.batch_size
    epoch_s = n / ours
    # The epoch as a trial lives it: training + evaluation (timed once here) + checkpoint.
    t0 = time.perf_counter()
    weights = resolve_weights(spec.model.weights, spec.model.arch, spec.data.image_size)
    model = build_model(spec.model, data.num_classes, hp, weights).model
    evaluate(model, data.val_x, data.val_y)
    eval_s = time.perf_counter() - t0
    share = ck["save_s"] / (epoch_s + eval_s + ck["save_s"])
    return {"threads": threads, "repeats": reps, "ours_img_s": ours, "hand_img_s": hand,
            "ratio": ratio, "cpu_time_ratio": cpu_ratio, "target": TARGET,
            "checkpoint_save_s": ck["save_s"],
            "checkpoint_mb": ck["size_mb"], "epoch_train_s": epoch_s, "epoch_eval_s": eval_s,
            "checkpoint_share": share}


def spec_hparams(spec: Spec) -> dict[str, Any]:
    """The default fine-tune of `spec`: its fixed knobs and Hyperparams' defaults."""
    return {n: p.value for n, p in spec.search.items()
            if p.space == "fixed" and n in Hyperparams.model_fields}


def gpu_section(spec: Spec, repeats: int, smoke: bool) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    size = 32 if smoke else 128
    s = spec.model_copy(update={
        "data": spec.data.model_copy(update={"image_size": size, "train_limit": None}),
        "train": spec.train.model_copy(update={"device": "cuda", "max_epochs": 3,
                                               "precision": "auto"})})
    ensure_backbone(s, echo=lambda line: None)
    data = prepare(s.data)
    hp = Hyperparams(**{**spec_hparams(s), "augment": "none", "batch_size": 128})
    dev = pick_device("cuda")
    reps = []
    for _ in range(repeats):
        got = {"ours": rtft_train(s, data, hp, 1)[-1]["images_per_s"],
               "naive": hand_loop(s, data, hp, dev, 3, fast=False)[-1],
               "tuned": hand_loop(s, data, hp, dev, 3, fast=True)[-1]}
        reps.append(got)
    return {"device": torch.cuda.get_device_name(), "image_size": size, "batch_size": 128,
            "train_images": len(data.train_y), "repeats": reps,
            "ours_img_s": median([g["ours"] for g in reps]),
            "naive_img_s": median([g["naive"] for g in reps]),
            "tuned_img_s": median([g["tuned"] for g in reps]),
            "ours_vs_naive": median([g["ours"] / g["naive"] for g in reps]),
            "ours_vs_tuned": median([g["ours"] / g["tuned"] for g in reps])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="16 px digits, once: seconds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a trial: 1)")
    ap.add_argument("--out", help="results folder (default bench/results)")
    args = ap.parse_args()
    if args.smoke:
        args.repeats = 1
    res = Results("trainer", smoke=args.smoke, out_dir=Path(args.out) if args.out else RESULTS)
    spec = load_spec(DEFAULT_SPEC, SMOKE_OVERRIDES if args.smoke else [])
    ensure_backbone(spec, echo=print)
    data = prepare(spec.data).without_test()
    c = cpu_section(spec, data, args.repeats, args.threads)
    print(f"\nCPU, {args.threads} thread(s), resnet18 at {spec.data.image_size} px, batch "
          f"{spec_hparams(spec).get('batch_size', Hyperparams().batch_size)}, "
          f"{len(data.train_y)} images, median of {args.repeats}")
    print(table(["", "images/s", "ratio", "target"],
                [["hand-written loop", c["hand_img_s"], None, None],
                 ["rtft train()", c["ours_img_s"], c["ratio"], f">= {TARGET}"],
                 ["rtft train(), by CPU time (whole run)", None, c["cpu_time_ratio"],
                  f">= {TARGET}"]]))
    print(f"checkpoint per epoch: {c['checkpoint_save_s']:.3f} s ({c['checkpoint_mb']:.0f} MB), "
          f"{100 * c['checkpoint_share']:.1f} % of an epoch (train {c['epoch_train_s']:.2f} s "
          f"+ eval {c['epoch_eval_s']:.2f} s + save)")
    g = gpu_section(spec, args.repeats, args.smoke)
    if "skipped" in g:
        print(f"\nGPU section skipped: {g['skipped']}")
    else:
        print(f"\nGPU {g['device']}, {g['image_size']} px, batch {g['batch_size']}, "
              f"median of {args.repeats}")
        print(table(["", "images/s", "rtft ÷ this"],
                    [["naive fp32 loop", g["naive_img_s"], g["ours_vs_naive"]],
                     ["tuned loop (bf16, channels_last, on device)", g["tuned_img_s"],
                      g["ours_vs_tuned"]],
                     ["rtft train()", g["ours_img_s"], None]]))
    path = res.write(cpu=c, gpu=g)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
