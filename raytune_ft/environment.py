"""The environment a trial trained in, as far as it decides bit-equality: recorded per trial
(the checkpoint's `config.json`, key `environment`) and per run (`environment.json`), and
compared by `rtft reproduce` before it chooses between an exact comparison and a tolerance.

A float result is bit-equal only on the same software and the same kernels: the same torch
(and torchvision, numpy) build, the same CPU model and ISA (oneDNN and the BLAS pick kernels,
vector widths and blockings by ISA and cache sizes), the same torch thread count (reduction
order), and on a GPU the same device, CUDA and cuDNN, autotuner and determinism settings. The
AMP dtype changes every figure.

Keys of an environment (a flat JSON object):

- compared (:data:`DECIDING`): `torch`, `torchvision`, `numpy`, `arch` (platform.machine),
  `cpu` (model name), `isa` (the flags of :data:`ISA_FLAGS` the CPU has), `cpu_capability`
  (`torch.backends.cpu.get_cpu_capability()`: the vector ISA ATen's kernels use), `device`,
  `threads`, `amp` (`fp32`, `bf16` or `fp16`), `deterministic`
  (`torch.are_deterministic_algorithms_enabled()`), and on CUDA (null on CPU) `gpu`, `cuda`,
  `cudnn`, `cudnn_deterministic`, `cudnn_benchmark`;
- descriptive only (:data:`DESCRIPTIVE`, never compared): `ray` and `optuna` (a trial's
  parameters are recorded; the trainer, and so `rtft reproduce`, runs neither), `python`
  (the trainer's arithmetic is torch's), `os`, and `recorded_by` (`trial`: the trainer, in the
  trial's own process; `driver`: the process that ran the search, for `environment.json`,
  which alone adds `host`, the driver's host name, to tell whether a trial ran beside it).

No Ray here, and no torch at import: reading and comparing environments needs neither.
"""

from __future__ import annotations

import functools
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytune_ft.checkpoint import write_atomic

if TYPE_CHECKING:
    from raytune_ft.spec.schema import Spec

__all__ = ["DECIDING", "DESCRIPTIVE", "ISA_FLAGS", "RUN_FILE", "amp_name", "current",
           "differences", "for_spec", "read_run", "summary", "trial_device", "write_run"]

# The per-run record, in the run folder.
RUN_FILE = "environment.json"
# The CPU flags that change which kernels run (x86: SSE4.2 → AVX → AVX2/FMA → AVX-512 → AMX;
# arm: NEON/ASIMD → SVE), as /proc/cpuinfo spells them. Other flags (virtualisation, power
# management, ...) differ between machines with the same kernels.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
             "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "neon", "asimd", "asimddp", "bf16", "i8mm", "sve", "sve2")
# Compared by `differences`, in this order (see the module docstring).
DECIDING = ("torch", "torchvision", "numpy", "arch", "cpu", "isa", "cpu_capability", "device",
            "threads", "amp", "deterministic", "gpu", "cuda", "cudnn", "cudnn_deterministic",
            "cudnn_benchmark")
# Recorded, shown, never compared.
DESCRIPTIVE = ("ray", "optuna", "python", "os", "recorded_by", "host")


# --------------------------------------------------------------------------------------------
# What this process runs on
# --------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    """The installed version of `dist`, read from its metadata: nothing is imported (ray's
    import alone takes a second and starts threads)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpuinfo() -> tuple[str | None, list[str]]:
    """(CPU model name, its flags) from /proc/cpuinfo; (None, []) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None, []
    name, flags = None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and name is None and value.strip():
            name = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 / arm
            flags = value.split()
        if name is not None and flags:
            break  # every core repeats the same block
    return name, flags


@functools.cache
def _machine() -> dict[str, Any]:
    """What does not change while the process runs: read once per process (every trial a
    worker runs reuses it)."""
    import torch

    name, flags = _cpuinfo()
    have = set(flags)
    return {
        "torch": torch.__version__, "torchvision": _version("torchvision"),
        "numpy": _version("numpy"), "ray": _version("ray"), "optuna": _version("optuna"),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}".strip(),
        "arch": platform.machine() or None,
        "cpu": name or platform.processor() or None,
        "isa": [f for f in ISA_FLAGS if f in have],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


@functools.cache
def _cuda() -> dict[str, Any]:
    """The GPU this process trains on and its CUDA stack (read once: the first call
    initialises CUDA, which the trainer has done by then)."""
    import torch

    if not torch.cuda.is_available():  # a driver on a machine without the trials' GPU
        return {"gpu": None, "cuda": torch.version.cuda, "cudnn": None}
    return {"gpu": torch.cuda.get_device_name(torch.cuda.current_device()),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def amp_name(device: str, precision: str) -> str:
    """The autocast dtype `precision` (`auto`, `fp32`, `bf16`, `fp16`) means on `device`
    (`cpu`, `cuda`): `fp32` (no autocast), `bf16` or `fp16`. `auto` is fp32 on CPU, bf16 on a
    GPU that supports it, else fp16. The trainer's rule (train._amp)."""
    if precision == "fp32" or (precision == "auto" and device == "cpu"):
        return "fp32"
    if precision == "bf16":
        return "bf16"
    if precision == "auto":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp16"


def current(*, device: str = "cpu", amp: str = "fp32", threads: int | None = None,
            cudnn_benchmark: bool | None = None, recorded_by: str = "trial") -> dict[str, Any]:
    """The environment of a training in this process on `device` (`cpu` or `cuda`) with
    autocast `amp` (:func:`amp_name`) and `threads` torch threads (default: torch's count now).

    `cudnn_benchmark`: what the trainer sets on CUDA, for a caller that asks before training
    (`rtft reproduce`); default torch's setting now. The machine's part is read once per
    process; each call costs a dict."""
    import torch

    on_cuda = device == "cuda"
    # The search's driver never touches CUDA: initialising it there would hold a context
    # (hundreds of MB) on the GPU its trials pack onto. Its record names the CUDA build only;
    # each trial records its GPU in its checkpoint.
    cuda = (_cuda() if on_cuda and recorded_by != "driver"
            else {"gpu": None, "cuda": torch.version.cuda if on_cuda else None, "cudnn": None})
    if cudnn_benchmark is None:
        cudnn_benchmark = bool(torch.backends.cudnn.benchmark)
    return {
        **_machine(), "device": device,
        "threads": int(threads) if threads else torch.get_num_threads(), "amp": amp,
        "deterministic": torch.are_deterministic_algorithms_enabled(), **cuda,
        # cuDNN's settings change nothing on a CPU: recorded there as null.
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic) if on_cuda else None,
        "cudnn_benchmark": cudnn_benchmark if on_cuda else None,
        "recorded_by": recorded_by,
    }


def trial_device(spec: Spec) -> str:
    """Where the search ran the trials of `spec`: Ray hides every GPU from a trial that asks
    for none (CUDA_VISIBLE_DEVICES=""), so `device: auto` meant CPU unless
    `run.resources.gpu` > 0."""
    if spec.train.device == "cpu" or spec.run.resources.gpu == 0:
        return "cpu"
    return "cuda"


def for_spec(spec: Spec, *, recorded_by: str = "trial") -> dict[str, Any]:
    """The environment a trial of `spec` gets in this process: its device, its autocast, one
    thread per `run.resources.cpu` (search/trainable.py's rule), and on CUDA the cuDNN
    autotuner on (the trainer turns it on)."""
    device = trial_device(spec)
    return current(device=device, amp=amp_name(device, spec.train.precision),
                   threads=max(1, int(spec.run.resources.cpu)),
                   cudnn_benchmark=device == "cuda", recorded_by=recorded_by)


# --------------------------------------------------------------------------------------------
# Per run
# --------------------------------------------------------------------------------------------
def write_run(run_dir: str | Path, spec: Spec) -> Path:
    """Write the run's `environment.json` (atomically, with the umask's mode): the
    environment of the process that runs the search, with the trials' device, autocast and
    threads. On one machine that is the trials' own; on a cluster the driver's (the trials'
    are in their checkpoints' config.json, which `rtft reproduce` reads first; `host` tells
    it whether a trial without a checkpoint ran here). A resumed search writes it again: the
    machine that runs the rest."""
    path = Path(run_dir) / RUN_FILE
    env = {**for_spec(spec, recorded_by="driver"), "host": platform.node() or None}
    write_atomic(path, json.dumps(env, indent=1, sort_keys=True) + "\n")
    return path


def read_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's recorded environment, or None when it has none (runs of rtft before it was
    recorded) or it cannot be read."""
    try:
        env = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return env if isinstance(env, dict) else None


# --------------------------------------------------------------------------------------------
# Comparing and showing
# --------------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two environments on the keys of :data:`DECIDING`, one line each
    (`cpu: Intel Xeon X → AMD EPYC Y`, `isa: avx512f missing here`, `threads: 4 → 2`); empty
    when they are the same. A key the recorded environment lacks (an older rtft) counts as a
    difference: unknown is not the same."""
    out = []
    for key in DECIDING:
        now_v = now.get(key)
        if key not in recorded:
            out.append(f"{key}: not recorded (here {_show(now_v)})")
            continue
        was = recorded[key]
        if key == "isa" and isinstance(was, list) and isinstance(now_v, list):
            missing = [f for f in was if f not in now_v]
            extra = [f for f in now_v if f not in was]
            parts = ([f"{', '.join(missing)} missing here"] if missing else []) + \
                    ([f"{', '.join(extra)} only here"] if extra else [])
            if parts:
                out.append("isa: " + "; ".join(parts))
        elif was != now_v:
            out.append(f"{key}: {_show(was)} → {_show(now_v)}")
    return out


def summary(env: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows describing `env` for people (the model card): software, CPU, GPU
    when one was used, threads, precision, determinism."""
    rows = [("torch / torchvision", f"{_show(env.get('torch'))} / "
                                    f"{_show(env.get('torchvision'))}"),
            ("CPU", f"{_show(env.get('cpu'))} ({_show(env.get('arch'))})"),
            ("CPU ISA", f"{_show(env.get('isa'))}; torch kernels: "
                        f"{_show(env.get('cpu_capability'))}")]
    if env.get("device") == "cuda":
        rows.append(("GPU", f"{_show(env.get('gpu'))}, CUDA {_show(env.get('cuda'))}, "
                            f"cuDNN {_show(env.get('cudnn'))}"))
    rows += [("device, torch threads", f"{_show(env.get('device'))}, {_show(env.get('threads'))}"),
             ("precision (autocast)", _show(env.get("amp"))),
             ("deterministic algorithms", _show(env.get("deterministic"))),
             ("numpy / Ray / Optuna / Python", " / ".join(
                 _show(env.get(k)) for k in ("numpy", "ray", "optuna", "python")))]
    return rows


if __name__ == "__main__":  # `python -m raytune_ft.environment`: this machine's, as JSON
    json.dump(current(recorded_by="driver"), sys.stdout, indent=1)
    print()
