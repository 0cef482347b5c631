"""A run folder without Ray: where it lives, its trial records and their `trials.json`.

Everything that reads a finished run (`rtft results`, the report, promotion) goes through
here and never starts Ray: the records come from the run's `trials.json`. Reading Ray's own
experiment state, when `trials.json` is missing or stale, is `search.records`' job.

Records: :class:`TrialRecord` is what the search knows of one trial, free of Ray types.
Cost: what the trainer measured of each trial's model (`COST_KEYS`, :attr:`TrialRecord.cost`).
Which trials rank first and which promotion takes is :mod:`raytune_ft.selection`; the tables
that show them, :mod:`raytune_ft.tables`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_ft.errors import TrialOOMError
from raytune_ft.paths import cache_dir, is_uri
from raytune_ft.spec.schema import METRICS, Spec

__all__ = ["COST_KEYS", "HISTORY_KEYS", "RUN_FILES", "TUNE_DIR", "Echo", "RunLocation",
           "TrialRecord", "read_records", "records_from_json", "run_location", "trial_state",
           "write_records"]

Echo = Callable[[str], None]
# Ray's experiment folder inside our run folder. Ray re-uploads its own folder from a staging
# copy at every snapshot, which would roll back files we keep there (the Optuna journal, ASHA's
# rungs) to their state at restore: ours live beside it, never inside.
TUNE_DIR = "tune"
# rtft's own run files. With an s3:// or gs:// storage_path they are written to a local staging
# folder on the driver's machine (the Optuna journal is appended on every ask and tell, ASHA's
# decision log on every result: too chatty for object storage) and uploaded to the run's URI
# after every finished trial and at the end (search.storage).
# teacher.json: distill.TEACHER_FILE; mlflow.json: search.tracking.STATE_FILE (both above).
RUN_FILES = ("spec.yaml", "data.json", "trials.json", "optuna.journal", "asha_rungs.json",
             "asha_decisions.jsonl", "environment.json", "teacher.json", "mlflow.json")
# Per-epoch metrics kept in TrialRecord.history (Ray adds many bookkeeping columns).
# The cost of a trial's model, reported by the trainer with every epoch (raytune_ft.model.cost):
# parameters, forward FLOPs per image, median latency at batch 1 and 32 on the trial's device
# (measured once per trial), and each epoch's wall seconds. Runs of rtft before them lack them.
COST_KEYS = ("params", "flops", "latency_b1_ms", "latency_b32_ms", "epoch_s")
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_acc", "best_val_acc", "best_val_loss",
                "lr", "images_per_s", "diverged", "time_total_s", "timestamp", *COST_KEYS)


# --------------------------------------------------------------------------------------------
# Where a run lives
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunLocation:
    """Where a run lives: `local` holds rtft's files (the run folder itself, or with a URI
    storage_path its staging copy); `remote` is the run's URI (s3://bucket/prefix/<name>)."""

    local: Path
    remote: str | None = None

    @property
    def root(self) -> str:
        """The run folder as the user named it: a path, or a URI."""
        return self.remote or str(self.local)

    @property
    def tune_path(self) -> str:
        """Ray's experiment folder (or URI)."""
        return f"{self.root}/{TUNE_DIR}"


def run_location(spec: Spec) -> RunLocation:
    """The run folder of `spec`; for a URI storage_path, its local staging folder under the
    rtft cache ($RTFT_CACHE/staging/<hash of the URI>/<name>) and the URI."""
    storage = spec.run.storage_path
    if is_uri(storage):
        remote = f"{storage.rstrip('/')}/{spec.name}"
        digest = hashlib.sha1(remote.encode()).hexdigest()[:12]
        return RunLocation(cache_dir() / "staging" / digest / spec.name, remote)
    return RunLocation(Path(storage).expanduser().resolve() / spec.name)


# --------------------------------------------------------------------------------------------
# Trial records and ranking
# --------------------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    """What the search knows of one trial, free of Ray types."""

    trial_id: str
    params: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_checkpoint: str | None = None
    error: str | None = None

    @property
    def epochs(self) -> int:
        return max((int(h.get("epoch", 0)) for h in self.history), default=0)

    @property
    def diverged(self) -> bool:
        return any(h.get("diverged") for h in self.history)

    def best(self, metric: str) -> float | None:
        """Best-so-far value of `metric` over the trial's epochs (not its last value)."""
        vals = [h[metric] for h in self.history
                if metric in h and not h.get("diverged") and _finite(h[metric])]
        if not vals:
            return None
        return max(vals) if METRICS[metric] == "max" else min(vals)

    @property
    def cost(self) -> dict[str, float]:
        """What the trial's model costs: `params`, `flops`, `latency_b1_ms`, `latency_b32_ms`
        (the same every epoch: the last reported value) and `epoch_s` (the mean over its
        epochs). Only the keys the history holds: empty for runs of rtft before costs."""
        out: dict[str, float] = {}
        for key in COST_KEYS:
            vals = [h[key] for h in self.history if _finite(h.get(key))]
            if vals:
                out[key] = sum(vals) / len(vals) if key == "epoch_s" else vals[-1]
        return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def trial_state(r: TrialRecord, max_t: int) -> str:
    """completed / stopped@<epoch> (early-stopped by ASHA) / diverged / failed / oom /
    pending."""
    if r.diverged:
        return "diverged"
    if r.error:
        return "oom" if TrialOOMError.__name__ in r.error else "failed"
    if r.epochs >= max_t:
        return "completed"
    return f"stopped@{r.epochs}" if r.epochs else "pending"


def records_from_json(run_dir: Path) -> list[TrialRecord] | None:
    """The run's trials.json, when no search has touched the run since it was written: the
    same records run_search built, without re-reading every trial's results (Ray's
    ExperimentAnalysis takes seconds over a few hundred trials). None: read Ray's state."""
    path, states = run_dir / "trials.json", list((run_dir / TUNE_DIR).glob("experiment_state*"))
    if not path.exists() or not states:
        return None
    if path.stat().st_mtime < max(s.stat().st_mtime for s in states):
        return None  # a resumed search ran since, or one is running
    try:
        return read_records(path)
    except (ValueError, TypeError):  # hand-edited or from another version: Ray's state decides
        return None


def read_records(path: Path) -> list[TrialRecord]:
    """The records in a `trials.json` (ValueError/TypeError when it is not one). Its `cost`
    is derived from the history again, not read. Checkpoint paths are taken in the run folder
    the file is in now (the file names them absolutely, where the run was written)."""
    records = [TrialRecord(**{k: v for k, v in r.items() if k != "cost"})
               for r in json.loads(path.read_text())]
    for r in records:
        r.best_checkpoint = _in_run(r.best_checkpoint, path.parent)
    return records


def _in_run(checkpoint: str | None, run_dir: Path) -> str | None:
    """A checkpoint path recorded in a run folder, re-rooted at `run_dir`: the part from
    `tune/trial_<id>/` on is kept. URIs and paths already inside `run_dir` stay."""
    if not checkpoint or is_uri(checkpoint):
        return checkpoint
    parts = Path(checkpoint).parts
    at = [i for i in range(len(parts) - 1)
          if parts[i] == TUNE_DIR and parts[i + 1].startswith("trial_")]
    if not at:
        return checkpoint
    moved = run_dir.resolve().joinpath(*parts[at[-1]:])
    return str(moved) if str(moved) != checkpoint else checkpoint


def write_records(run_dir: Path, records: list[TrialRecord]) -> None:
    """Write `trials.json`: what `rtft results`, the report and promotion read back; each
    trial with its `cost` (for readers of the file other than rtft)."""
    (run_dir / "trials.json").write_text(json.dumps(
        [{**r.__dict__, "cost": r.cost} for r in records], indent=1, default=str))


