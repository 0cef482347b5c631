"""What every benchmark script shares: the machine description, medians, tables, results files.

Every figure a script reports is measured side by side in one run and written, with the
machine it ran on and the load average at its start and end (the machines are shared), to
``bench/results/<name>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SPEC = ROOT / "search_spaces" / "resnet.yaml"

# The tiny task --smoke modes run: 16 px digits, 160 training images, no pretrained weights
# (nothing to build first), so a trial takes about a second.
SMOKE_OVERRIDES = ["data.image_size=16", "data.train_limit=160", "data.val_fraction=0.1",
                   "data.test_fraction=0.1", "model.weights=none", "train.max_epochs=1",
                   "scheduler.grace_period=1", "scheduler.brackets=1"]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: recorded as missing
        return None


def machine() -> dict[str, Any]:
    """Cores, library versions and GPU (if any) of this machine, plus the current load."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(), "count": torch.cuda.device_count(),
               "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "ray": _version("ray"),
            "optuna": _version("optuna"), "gpu": gpu}


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other people's work shows up here)."""
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: Sequence[float]) -> float:
    """Median, NaN for an empty sequence."""
    return statistics.median(xs) if xs else float("nan")


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table; floats with 3 significant decimals."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=False)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in cells]
    return "\n".join(lines)


class Results:
    """Collects one script's results and writes ``<dir>/<name>.json`` atomically."""

    def __init__(self, name: str, *, smoke: bool, out_dir: Path | None = None) -> None:
        self.name, self.smoke = name, smoke
        self.out_dir = out_dir or RESULTS
        self.t0 = time.time()
        self.data: dict[str, Any] = {"name": name, "smoke": smoke, "machine": machine(),
                                     "load_start": load_average()}

    def write(self, **fields: Any) -> Path:
        """Add `fields`, stamp the end load and duration, and write the JSON file."""
        self.data.update(fields)
        self.data["load_end"] = load_average()
        self.data["seconds"] = round(time.time() - self.t0, 1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, path)
        return path


def out_dir_arg(value: str | None) -> Path:
    """`--out DIR` or bench/results."""
    return Path(value) if value else RESULTS
