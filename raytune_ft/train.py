"""The trainer: one plain function that fine-tunes one configuration. No Ray in here.

It reads top to bottom: devices and seeds, data on the device, model, optimizer and schedule,
resume, then the epoch loop (train, evaluate, checkpoint, report). The search wraps
``report`` to forward metrics and checkpoints to Ray Tune; tests and benchmarks pass a list's
``append``.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raytune_ft.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from raytune_ft.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Splits,
    augment_batch,
    iter_batches,
    normalize,
)
from raytune_ft.environment import amp_name
from raytune_ft.environment import current as current_environment
from raytune_ft.knobs import Hyperparams
from raytune_ft.model.build import (
    build_model,
    freeze_stages,
    input_stats,
    param_groups,
    resolve_weights,
)
from raytune_ft.model.cost import measure as measure_cost
from raytune_ft.sources import Images, Pixels
from raytune_ft.spec.schema import METRICS, Spec

__all__ = ["DIVERGED", "TrainResult", "distill_loss", "evaluate", "focal_loss", "loss_function",
           "pick_device", "train", "trial_config"]

# A report's checkpoint folder is only valid during the call: copy it if you keep it.
Report = Callable[[dict[str, Any], "Path | None"], None]
# What a diverged trial reports: the worst value of each metric, so the sampler learns.
DIVERGED = {"val_acc": 0.0, "val_loss": 1e9, "train_loss": 1e9}


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged: bool = False


def pick_device(setting: str) -> torch.device:
    """`auto` → CUDA when there is one, else CPU."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _amp(device: torch.device, precision: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed); the rule is
    :func:`raytune_ft.environment.amp_name`'s, which records it."""
    name = amp_name(device.type, precision)
    if name == "fp32":
        return None, False
    if name == "bf16":
        return torch.bfloat16, False
    return torch.float16, device.type == "cuda"


def trial_config(spec: Spec, hp: Hyperparams, classes: list[str]) -> dict[str, Any]:
    """Everything needed to rebuild and reuse a trained model, as plain JSON."""
    import torchvision

    return {"spec": spec.model_dump(mode="json"), "hparams": hp.model_dump(mode="json"),
            "classes": classes, "versions": {"torch": torch.__version__,
                                             "torchvision": torchvision.__version__}}


@torch.no_grad()
def evaluate(model: nn.Module, x: Pixels, y: torch.Tensor, *, batch_size: int = 512,
             amp_dtype: torch.dtype | None = None, mean: tuple = IMAGENET_MEAN,
             std: tuple = IMAGENET_STD, workers: int = 0) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on uint8 images `x` and labels `y`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for xb, yb in iter_batches(x, y, torch.arange(len(y)), batch_size, device=device,
                               workers=workers):
        with _autocast(device, amp_dtype):
            logits = model(normalize(xb, mean, std))
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    n = max(len(y), 1)
    return loss_sum / n, correct / n


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Focal loss, mean over the batch: -(1 - p_t)^gamma * log p_t for class indices.

    Soft targets (MixUp/CutMix probabilities, label smoothing) use the soft-target form
    sum_c -y_c (1 - p_c)^gamma log p_c, which is the hard form when y is one-hot; smoothing
    mixes y with the uniform distribution as CrossEntropyLoss does. gamma 0 is cross-entropy.
    """
    if gamma == 0:
        # The same call as the cross-entropy loss: a focal trial at gamma 0 is bit for bit a
        # cross-entropy trial (the formula below agrees to float rounding only).
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    logp = F.log_softmax(logits.float(), dim=1)  # float32 under AMP too, as cross_entropy
    n_classes = logp.shape[1]
    y = F.one_hot(target, n_classes).to(logp.dtype) if not target.is_floating_point() \
        else target.to(logp.dtype)
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / n_classes
    # 1 - p floored at 1e-6: where p rounds to 1 the pow's gradient at 0 is inf (gamma < 1)
    # and inf * 0 is NaN; the floor changes the loss by < 1e-6 * |log p| there, i.e. nothing.
    weight = (1 - logp.exp()).clamp_min(1e-6).pow(gamma)
    return -(y * weight * logp).sum(1).mean()


def loss_function(hp: Hyperparams) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss `hp` names: (logits, class indices or probabilities) -> scalar."""
    if hp.loss == "focal":
        return functools.partial(focal_loss, gamma=hp.focal_gamma,
                                 label_smoothing=hp.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)


def distill_loss(task_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, *,
                 alpha: float, temperature: float) -> torch.Tensor:
    """(1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
    the KL summed over classes and averaged over the batch (Hinton et al. 2015).

    T^2 keeps the soft term's gradients on the task loss's scale as T grows. Computed in
    float32 (under AMP too, as the task losses are)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, dim=1),
                  F.log_softmax(teacher.float() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * task_loss + alpha * t * t * kl


def _mixer(hp: Hyperparams, num_classes: int) -> Callable | None:
    """torchvision's MixUp / CutMix on a batch (one of the two per batch when both are on)."""
    from torchvision.transforms import v2

    ops = [op for alpha, op in ((hp.mixup_alpha, v2.MixUp), (hp.cutmix_alpha, v2.CutMix))
           if alpha > 0 for op in [op(alpha=alpha, num_classes=num_classes)]]
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def _autocast(device: torch.device, dtype: torch.dtype | None):  # noqa: ANN202
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to zero at the last step."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _optimizer(hp: Hyperparams, groups: list[dict]) -> torch.optim.Optimizer:
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
    cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=hp.lr)


def _checkpoint_due(spec: Spec, epoch: int, last_saved: float) -> bool:
    """Whether epoch `epoch` ends with a checkpoint: the trial's last epoch (`max_t`, where
    ASHA ends it, or `train.max_epochs`), every `run.checkpoint_every` epochs, and any epoch
    ending `run.checkpoint_every_minutes` after the last checkpoint.

    Not every epoch: a checkpoint is the model and optimizer state (128 MB for resnet18 with
    Adam), written, then copied by Ray into the trial's folder, on the training path
    (bench/README.md, "Per-epoch cost"). A retried or resumed trial re-trains the epochs since
    its last checkpoint, with the same results: each epoch is seeded by its number."""
    run = spec.run
    return (epoch >= min(spec.max_t, spec.train.max_epochs)
            or (run.checkpoint_every > 0 and epoch % run.checkpoint_every == 0)
            or time.monotonic() - last_saved >= 60 * run.checkpoint_every_minutes)


def _trace(event: str, **extra: float) -> None:
    """With RTFT_TRACE=<file>, append when a trial starts, is ready to take its first step and
    ends, and how long each epoch's report took (`report`, with `s` seconds and `ckpt` 1 when
    it wrote a checkpoint): bench/overhead.py measures trial start-up and the per-epoch cost
    with it. Unset, nothing is done."""
    path = os.environ.get("RTFT_TRACE")
    if path:
        fields = "".join(f', "{k}": {v}' for k, v in extra.items())
        with open(path, "a") as f:
            f.write(f'{{"event": "{event}", "t": {time.time()}, "pid": {os.getpid()}'
                    f'{fields}}}\n')


def train(hp: Hyperparams, *, spec: Spec, data: Splits, report: Report,
          weights: str | None = None, resume_from: str | Path | None = None,
          num_threads: int | None = None, checkpoints: bool = True) -> TrainResult:
    """Fine-tune one configuration for `spec.train.max_epochs` epochs.

    Each epoch ends with ``report(metrics, checkpoint_folder)``: metrics are `epoch`,
    `train_loss`, `val_loss`, `val_acc`, `best_<metric>`, `lr`, `images_per_s`, `diverged`,
    the model's cost (`params`, `flops`, `latency_b1_ms`, `latency_b32_ms`: measured once
    before the first epoch, see cost.py) and `epoch_s` (the epoch's seconds, train + eval).
    `weights` overrides `spec.model.weights` (a resolved file path for `rtft:` recipes).
    A loss that turns NaN/inf ends training at once with :data:`DIVERGED` metrics.
    """
    _trace("start")
    # A combination the spec cannot rule out alone (both may be searched): this trial fails,
    # is recorded with this message, and the search goes on.
    if hp.warmup_epochs >= spec.train.max_epochs:
        raise ValueError(f"warmup_epochs ({hp.warmup_epochs}) must be below train.max_epochs "
                         f"({spec.train.max_epochs}): the schedule would never leave warmup")
    teacher_logits = data.teacher_logits if hp.distill_alpha > 0 else None
    if teacher_logits is not None and (hp.mixup_alpha > 0 or hp.cutmix_alpha > 0):
        # The teacher's logits are those of the unmixed images: a mixed batch has none.
        raise ValueError("distillation (model.teacher) cannot be combined with mixup_alpha / "
                         "cutmix_alpha > 0: the teacher's logits are of the unmixed images")
    # -- devices, threads, seeds ---------------------------------------------------------------
    device = pick_device(spec.train.device)
    if num_threads and device.type == "cpu":
        torch.set_num_threads(num_threads)
    amp_dtype, use_scaler = _amp(device, spec.train.precision)
    torch.manual_seed(spec.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # -- data: small sets live on the device as uint8, batches are index slices; larger ones
    # -- stream from disk through DataLoader workers (random resized crops when augmenting) --
    def on_device(x: Pixels) -> Pixels:
        return x.to(device) if isinstance(x, torch.Tensor) else x

    train_x, train_y = on_device(data.train_x), data.train_y.to(device)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(device)
    val_x, val_y = on_device(data.val_x), data.val_y.to(device)
    if isinstance(train_x, Images) and hp.augment != "none":
        train_x = replace(train_x, train_crop=True)
    workers = spec.data.workers if spec.data.workers is not None else max(1, num_threads or 1)
    mean, std = input_stats(spec.model)
    mix = _mixer(hp, data.num_classes)
    n = len(train_y)
    bs = min(hp.batch_size, n)
    steps_per_epoch = n // bs  # drop the ragged last batch: BatchNorm dislikes tiny batches
    epochs = spec.train.max_epochs

    # -- model, optimizer, schedule --------------------------------------------------------------
    weights = resolve_weights(weights or spec.model.weights, spec.model.arch,
                              spec.data.image_size)
    built = build_model(spec.model, data.num_classes, hp, weights)
    model = built.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    frozen_norms = freeze_stages(built, hp)  # freeze_depth or freeze_fraction, clamped
    optimizer = _optimizer(hp, param_groups(built, lr=hp.lr, weight_decay=hp.weight_decay,
                                            backbone_lr_mult=hp.backbone_lr_mult,
                                            layer_decay=hp.layer_decay))
    total = epochs * steps_per_epoch
    last_epoch = min(spec.max_t, epochs)  # where ASHA (max_t) or the schedule ends the trial
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(round(hp.warmup_epochs * steps_per_epoch), total))
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    loss_fn = loss_function(hp)
    metric, mode = spec.metric, METRICS[spec.metric]
    config = trial_config(spec, hp, data.classes)
    # What decides whether `rtft reproduce` can expect the same bits (environment.py): read
    # after the threads and cuDNN flags are set; the machine's part once per process.
    config["environment"] = current_environment(
        device=device.type, amp=amp_name(device.type, spec.train.precision))

    # -- resume ----------------------------------------------------------------------------------
    start, best = 0, None
    best_model: dict[str, torch.Tensor] | None = None  # the best epoch's weights, on the CPU
    best_epoch: int | None = None
    if resume_from is not None:
        state, _ = load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        start, best = int(state["epoch"]), state.get("best")
        if "optimizer" not in state:  # a final checkpoint: the trial has nothing left to do
            if start < last_epoch:
                raise CheckpointError(f"checkpoint {resume_from} holds no optimizer state, "
                                      f"yet epoch {start} is not the trial's last")
            _trace("end")
            return TrainResult(model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # Checkpoints of rtft <= 0.2 (one per epoch) hold no best weights: the epoch's own.
        best_model = state.get("best_model", state["model"])
        best_epoch = int(state.get("best_epoch", state["epoch"]))
    # The model's cost in the trial's own inference setting (device, autocast, channels_last
    # on CUDA, threads), on a resumed trial too (its report carries it every epoch). It draws
    # no random numbers and changes no weight, statistic or mode: training is the same.
    cost = measure_cost(model, spec.data.image_size, amp_dtype=amp_dtype,
                        channels_last=device.type == "cuda").as_metrics()
    last_saved = time.monotonic()

    _trace("ready")
    result = TrainResult(model)
    for epoch in range(start + 1, epochs + 1):
        if hp.unfreeze_at_epoch and epoch >= hp.unfreeze_at_epoch and frozen_norms:
            frozen_norms = freeze_stages(built, 0)
        # A generator per epoch, seeded by epoch: a resumed run sees the same batches; the
        # global RNG too (dropout, mixup/cutmix draws).
        epoch_seed = spec.train.seed * 100_003 + epoch
        gen = torch.Generator().manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        model.train()
        for m in frozen_norms:  # keep pretrained BN statistics in frozen stages
            m.eval()

        # -- train one epoch ---------------------------------------------------------------------
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        loss_sum = torch.zeros((), device=device)
        batches = iter_batches(train_x, train_y, perm, bs, device=device, workers=workers,
                               drop_last=True, generator=gen)
        for b, (xb, yb) in enumerate(batches):
            xb = augment_batch(normalize(xb, mean, std), hp.augment, hflip=spec.data.flip,
                               generator=gen)
            if mix is not None:
                xb, yb = mix(xb, yb)  # soft labels: both losses take probabilities
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp_dtype):
                logits = model(xb)
                loss = loss_fn(logits, yb)
            if teacher_logits is not None:
                # iter_batches yields perm in consecutive chunks of bs: batch b is this slice.
                # The teacher saw the unaugmented images; with `augment` that is an
                # approximation (the usual one for logits computed offline).
                idx = perm[b * bs:(b + 1) * bs].to(device)
                loss = distill_loss(loss, logits, teacher_logits[idx], alpha=hp.distill_alpha,
                                    temperature=hp.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if hp.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
        train_loss = loss_sum.item() / max(steps_per_epoch, 1)  # one sync per epoch
        seconds = time.perf_counter() - t0

        # -- evaluate; a diverged trial (NaN/inf loss) stops at once with the worst values --
        val_loss, val_acc = evaluate(model, val_x, val_y, amp_dtype=amp_dtype, mean=mean,
                                     std=std, workers=workers)
        epoch_s = time.perf_counter() - t0
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            metrics = {"epoch": epoch, **DIVERGED, "lr": optimizer.param_groups[-1]["lr"],
                       "images_per_s": 0.0, "diverged": True,
                       f"best_{metric}": DIVERGED[metric] if best is None else best,
                       **cost, "epoch_s": epoch_s}
            result.diverged = True
            result.history.append(metrics)
            report(metrics, None)
            return result

        # -- checkpoint, report ----------------------------------------------------------------
        value = {"val_acc": val_acc, "val_loss": val_loss}[metric]
        if best is None or (value > best if mode == "max" else value < best):
            best, best_epoch = value, epoch
            if checkpoints:  # a copy, not a write: the next checkpoint takes it along
                best_model = {k: v.detach().to("cpu", copy=True)
                              for k, v in model.state_dict().items()}
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "val_acc": val_acc, f"best_{metric}": best,
                   "lr": optimizer.param_groups[-1]["lr"],
                   "images_per_s": steps_per_epoch * bs / seconds, "diverged": False,
                   **cost, "epoch_s": epoch_s}
        result.history.append(metrics)
        t_report = time.perf_counter()
        if not (checkpoints and _checkpoint_due(spec, epoch, last_saved)):
            report(metrics, None)
            _trace("report", s=time.perf_counter() - t_report, ckpt=0)
            continue
        final = epoch >= last_epoch  # no trial continues from it: weights only
        with tempfile.TemporaryDirectory(prefix="rtft-ckpt-") as tmp:
            save_checkpoint(tmp, model=model.state_dict(),
                            optimizer=None if final else optimizer.state_dict(),
                            scheduler=None if final else scheduler.state_dict(), epoch=epoch,
                            best=best, config=config, best_model=best_model,
                            best_epoch=best_epoch)
            report(metrics, Path(tmp))
        last_saved = time.monotonic()
        _trace("report", s=time.perf_counter() - t_report, ckpt=1)
    _trace("end")
    return result
