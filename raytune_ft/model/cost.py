"""What a model costs to run: parameters, forward FLOPs per image, latency at batch 1 and 32.

Measured on the model as the trial built it, on the trial's device and in its inference
setting (autocast dtype, channels_last), with an input of zeros. A measurement leaves no trace:
every RNG state, the weights, BatchNorm's running statistics and each module's train/eval mode
are as they were, so a trial trains bit for bit the same with or without it (and a resumed
trial the same as one that never stopped).

Results are cached per process: a Ray actor reused for trial after trial (`reuse_actors`)
measures each distinct model once. The key is the model's structure (its class, `repr`, and
every parameter's and buffer's name, shape and dtype) with the input size, device, dtype,
memory format and thread count: any knob that changes the network changes its `repr` or its
shapes, with no list of knobs to keep in step. (A custom `model.factory` module whose forward
depends on an attribute its `repr` does not show would share a key it should not; torchvision's
modules show all of theirs.) Why cache at all: resnet18 at 32 px costs a fraction of a second,
but a convnext at 224 px on a few CPUs takes seconds, every trial.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Cost", "clear_cache", "count_flops", "measure"]

# Time spent on the timed runs of one batch size, at most (one run always happens), and the
# most runs a median is taken over: small models get up to MAX_RUNS runs within BUDGET_S;
# a model whose single forward takes longer than BUDGET_S is timed once, after its warm-up.
BUDGET_S = 0.12
MAX_RUNS = 15

_CACHE: dict[tuple, Cost] = {}


@dataclass(frozen=True)
class Cost:
    """One model's cost. `flops`: forward FLOPs for one image, as
    torch.utils.flop_counter.FlopCounterMode counts them (a multiply-add is 2 FLOPs; only the
    ops it knows: convolutions, matmuls, attention; not activations or normalisation).
    Latencies: median wall time of one forward pass, in milliseconds."""

    params: int
    flops: float
    latency_b1_ms: float
    latency_b32_ms: float

    def as_metrics(self) -> dict[str, int | float]:
        """The four values as a trial's metrics (runs.COST_KEYS but `epoch_s`, which the
        trainer adds per epoch)."""
        return asdict(self)


def clear_cache() -> None:
    """Forget every measurement this process made."""
    _CACHE.clear()


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _zeros(batch: int, image_size: int, in_channels: int, device: torch.device,
           channels_last: bool) -> torch.Tensor:
    x = torch.zeros(batch, in_channels, image_size, image_size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def count_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs of `model` on `x` (the whole batch), by FlopCounterMode. Runs the model
    once as it stands: call it in eval mode under inference_mode, as :func:`measure` does."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return float(counter.get_total_flops())


def _median_ms(run: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Median wall time of `run()` in ms: one warm-up (allocations, oneDNN/cuDNN plans),
    then timed runs until BUDGET_S is spent or MAX_RUNS are done (at least one)."""
    run()
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < MAX_RUNS and (not times or spent + times[-1] <= BUDGET_S):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return 1000 * statistics.median(times)


def _key(model: nn.Module, image_size: int, in_channels: int, device: torch.device,
         amp_dtype: torch.dtype | None, channels_last: bool) -> tuple:
    shapes = tuple((n, tuple(t.shape), t.dtype) for n, t in
                   [*model.named_parameters(), *model.named_buffers()])
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return (type(model).__qualname__, repr(model), shapes, image_size, in_channels,
            str(device), amp_dtype, channels_last, threads)


def measure(model: nn.Module, image_size: int, *, amp_dtype: torch.dtype | None = None,
            channels_last: bool = False, in_channels: int = 3, cache: bool = True) -> Cost:
    """Parameters, forward FLOPs per image (batch 1) and latency at batch 1 and 32 of `model`
    on the device its parameters are on, on a zero input of `in_channels` x `image_size`^2.

    Forward passes run in eval mode under torch.inference_mode, with autocast to `amp_dtype`
    when given and a channels_last input when asked (the trial's own inference setting).
    RNG states (CPU and the model's CUDA device), weights, BN statistics and every module's
    train/eval mode are left as they were. A CUDA out-of-memory at batch 32 gives a NaN
    latency there rather than failing the trial. `cache=False` measures again."""
    device = _device_of(model)
    key = _key(model, image_size, in_channels, device, amp_dtype, channels_last)
    if cache and key in _CACHE:
        return _CACHE[key]
    params = sum(p.numel() for p in model.parameters())
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())
    modes = [(m, m.training) for m in model.modules()]  # frozen BN stages are eval in train
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if cuda else []
    try:
        model.eval()
        # Eval mode draws no random numbers in torchvision's models (dropout, stochastic depth
        # are off); fork_rng makes that a guarantee for any model, cuDNN's autotuner included.
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode(), autocast:
            x1 = _zeros(1, image_size, in_channels, device, channels_last)
            flops = count_flops(model, x1)
            b1 = _median_ms(lambda: model(x1), sync)
            try:
                x32 = _zeros(32, image_size, in_channels, device, channels_last)
                b32 = _median_ms(lambda: model(x32), sync)
            except torch.cuda.OutOfMemoryError:
                logging.getLogger(__name__).warning("out of memory timing batch 32 at %d px; "
                                                    "latency_b32_ms is NaN", image_size)
                torch.cuda.empty_cache()
                b32 = float("nan")
    finally:
        for m, training in modes:
            m.training = training
    cost = Cost(params=params, flops=flops, latency_b1_ms=b1, latency_b32_ms=b32)
    if cache:
        _CACHE[key] = cost
    return cost
