"""A run folder without Ray: where it lives, its trial records, how trials rank.

Everything that reads a finished run (`rtft results`, the report, promotion) goes through
here and never starts Ray: the records come from the run's `trials.json`. Reading Ray's own
experiment state, when `trials.json` is missing or stale, is `search.records`' job.

Records: :class:`TrialRecord` is what the search knows of one trial, free of Ray types.
Ranking: trials are ranked by their *best-so-far* value of the metric, never their last.
Cost: what the trainer measured of each trial's model (`COST_KEYS`, :attr:`TrialRecord.cost`);
promotion may bound it (`promote.max_latency_ms`, `promote.max_params`) or promote the
accuracy/latency Pareto front (:func:`pareto_front`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_ft.errors import TrialOOMError, UserError
from raytune_ft.paths import cache_dir, is_uri
from raytune_ft.spec import METRICS, Spec

__all__ = ["COST_KEYS", "HISTORY_KEYS", "RUN_FILES", "TUNE_DIR", "Echo", "RunLocation",
           "TrialRecord", "choose", "choose_for", "cost_cells", "fmt", "model_costs",
           "pareto_front", "ranked",
           "read_records", "records_from_json", "run_location", "rung_summary", "summary_rows",
           "summary_table", "text_table", "trial_state", "trial_table",
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
RUN_FILES = ("spec.yaml", "data.json", "trials.json", "optuna.journal", "asha_rungs.json",
             "asha_decisions.jsonl", "environment.json")
# Per-epoch metrics kept in TrialRecord.history (Ray adds many bookkeeping columns).
# The cost of a trial's model, reported by the trainer with every epoch (raytune_ft.cost):
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


def ranked(records: list[TrialRecord], metric: str) -> list[TrialRecord]:
    """All trials, best-so-far metric first; trials without a value last."""
    sign = -1.0 if METRICS[metric] == "max" else 1.0
    return sorted(records, key=lambda r: (r.best(metric) is None,
                                          sign * (r.best(metric) or 0.0), r.trial_id))


def fmt(v: Any) -> str:
    """A parameter value for tables: 3 significant digits for floats, '-' when absent."""
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def cost_cells(records: list[TrialRecord]) -> tuple[list[str], Callable[[TrialRecord],
                                                                      list[str]]]:
    """(header, cells of one trial) of the cost columns the records have: parameters in
    millions, FLOPs per image (in M or G, one unit for the column), latency at batch 1 in ms,
    seconds per epoch. No columns for a run without costs (rtft before them)."""
    have = {k for r in records for k in r.cost}
    giga = max((r.cost.get("flops", 0) for r in records), default=0) >= 1e9
    cols = [("params", "Mparams", 1e-6), ("flops", "GFLOPs" if giga else "MFLOPs",
                                          1e-9 if giga else 1e-6),
            ("latency_b1_ms", "ms b1", 1.0), ("epoch_s", "s/epoch", 1.0)]
    cols = [c for c in cols if c[0] in have]

    def cells(r: TrialRecord) -> list[str]:
        return [fmt(r.cost[k] * scale if k in r.cost else None) for k, _, scale in cols]

    return [h for _, h, _ in cols], cells


def trial_table(records: list[TrialRecord], spec: Spec,
                limit: int | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the trials, best first: id, state, epochs, best metric, the cost
    columns (:func:`cost_cells`) and each searched (non-fixed) parameter, the architecture
    first when it is searched. Text and HTML renderers share it."""
    m = spec.metric
    names = [n for n, p in spec.params.items() if p.space != "fixed"]  # fixed: same for all
    cost_head, cost = cost_cells(records)
    head = ["trial", "state", "epochs", f"best {m}", *cost_head, *names]
    rows = [[r.trial_id, trial_state(r, spec.max_t), str(r.epochs),
             "-" if r.best(m) is None else f"{r.best(m):.4f}", *cost(r),
             *[fmt(r.params.get(n)) for n in names]]
            for r in ranked(records, m)[:limit]]
    return head, rows


def model_costs(records: list[TrialRecord]) -> dict[str, dict[str, float]]:
    """Each trial's cost (:attr:`TrialRecord.cost`) with its latencies replaced by the median
    over the trials of the same model: the same `params` and `flops` (network, head and input
    size). Latency belongs to the model, but each trial measures it once at its start, on a
    machine it shares with other trials, so one reading is noisy (the same resnet18 read 5.4
    and 5.8 ms on 2 busy cores): two trials of one model must not land on either side of a
    bound or of the Pareto front by chance. Bounds, the front and its plot read this."""
    raw = {r.trial_id: r.cost for r in records}
    groups: dict[tuple, dict[str, list[float]]] = {}
    for c in raw.values():
        if "params" in c and "flops" in c:
            g = groups.setdefault((c["params"], c["flops"]), {})
            for key in ("latency_b1_ms", "latency_b32_ms"):
                if key in c:
                    g.setdefault(key, []).append(c[key])
    out: dict[str, dict[str, float]] = {}
    for tid, c in raw.items():
        g = groups.get((c.get("params"), c.get("flops")), {})
        out[tid] = {**c, **{key: _median(vals) for key, vals in g.items()}}
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def text_table(head: list[str], rows: list[list[str]], *, rule: bool = True) -> list[str]:
    """Fixed-width lines of a table (header, optional rule, rows)."""
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
             for row in [head, *rows]]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def choose(records: list[TrialRecord], metric: str, top_k: int = 1, *,
           max_latency_ms: float | None = None, max_params: int | None = None,
           costs: dict[str, dict[str, float]] | None = None) -> list[TrialRecord]:
    """The trials to promote, best first: among trials with a checkpoint (not diverged) that
    fit the bounds and reached the highest epoch any such trial reached, ranked by best-so-far
    metric.

    Bounds: `max_latency_ms` on the trial's `latency_b1_ms`, `max_params` on its `params`. The
    highest-epoch rule applies among the trials that fit: the best model that fits is chosen,
    even when a bigger one trained longer. A trial without cost data (a run of an rtft before
    costs were recorded) cannot satisfy a bound. When trials could be promoted but none fits,
    raises :class:`UserError` on the bound, with the smallest latency / size seen.
    """
    ok = [r for r in records if r.best_checkpoint and not r.diverged
          and r.best(metric) is not None]
    if not ok:
        return []
    if (max_latency_ms, max_params) == (None, None):
        costs = {}
    elif costs is None:  # per model, over every trial given (`model_costs`)
        costs = model_costs(records)
    fits = [r for r in ok if _fits(costs.get(r.trial_id, {}), max_latency_ms, max_params)]
    if not fits:
        raise _none_fits(ok, costs, max_latency_ms, max_params)
    top = max(r.epochs for r in fits)
    eligible = [r for r in fits if r.epochs == top]
    return ranked(eligible, metric)[:top_k]


def _fits(cost: dict[str, float], max_latency_ms: float | None,
          max_params: int | None) -> bool:
    if max_latency_ms is None and max_params is None:
        return True
    if max_latency_ms is not None and not cost.get("latency_b1_ms", math.inf) <= max_latency_ms:
        return False
    return max_params is None or cost.get("params", math.inf) <= max_params


def _none_fits(ok: list[TrialRecord], costs: dict[str, dict[str, float]],
               max_latency_ms: float | None, max_params: int | None) -> UserError:
    """One line: which bound no trial meets, the smallest value seen, trials without costs."""
    parts, fields = [], []
    for key, bound, field_name, unit in [
            ("latency_b1_ms", max_latency_ms, "max_latency_ms", " ms"),
            ("params", max_params, "max_params", "")]:
        if bound is None:
            continue
        seen = [costs[r.trial_id][key] for r in ok if key in costs[r.trial_id]]
        smallest = f"the smallest {key} is {fmt(min(seen))}{unit}" if seen else f"none has {key}"
        parts.append(f"{field_name} {fmt(bound)}{unit} ({smallest})")
        fields.append(field_name)
    missing = sum(1 for r in ok if not costs[r.trial_id])
    note = (f"; {missing} of them have no cost data (a run of an rtft before costs were "
            f"recorded) and cannot satisfy a bound" if missing else "")
    return UserError(f"no trial fits {' and '.join(parts)} among the {len(ok)} trial(s) that "
                     f"could be promoted{note}; allowed: a bound at least that large, or none",
                     field=f"promote.{fields[0]}" if len(fields) == 1 else "promote")


def pareto_front(records: list[TrialRecord], metric: str, mode: str,
                 cost: str = "latency_b1_ms", *,
                 costs: dict[str, dict[str, float]] | None = None) -> list[TrialRecord]:
    """The trials no other trial beats on both best-so-far `metric` and `cost`, cheapest first.

    Rule: trial A dominates trial B when A's cost <= B's cost and A's metric is at least as
    good (`mode` "max": >=, "min": <=), one of the two strictly. Trials without a metric value
    or without a finite `cost` value are left out. Ties are resolved deterministically: of
    trials with the same cost and metric, only the one with the smallest trial id is kept. The
    front is sorted by cost ascending (its metric then improves strictly along it). Latencies
    are per model (:func:`model_costs` of `records`, or `costs` when given: taken over a whole
    run, while the front may be taken among some of its trials): of several trials of one
    model, only the best can be on the front.
    """
    sign = -1.0 if mode == "max" else 1.0  # sign * metric: smaller is better
    costs = costs if costs is not None else model_costs(records)
    pts = [(float(costs[r.trial_id][cost]), sign * float(v), r.trial_id, r) for r in records
           if (v := r.best(metric)) is not None and _finite(costs[r.trial_id].get(cost))]
    front, best = [], math.inf
    # Cheapest first, best metric first within a cost: a trial is on the front exactly when
    # its metric is strictly better than every cheaper-or-equal trial's already seen.
    for _, m, _, r in sorted(pts, key=lambda p: p[:3]):
        if m < best:
            front.append(r)
            best = m
    return front


def choose_for(spec: Spec, records: list[TrialRecord], *,
               pareto: bool = False) -> list[TrialRecord]:
    """The trials promotion of `spec`'s run takes, in the order it takes them: :func:`choose`
    with `spec.promote`'s top_k and bounds; with `pareto`, every point of the accuracy /
    latency-at-batch-1 front among the trials :func:`choose` finds eligible (cheapest first,
    top_k not applied). Raises :class:`UserError` when the front needs costs no trial has."""
    p = spec.promote
    # Latency per model over the whole run, whichever trials are then compared.
    costs = model_costs(records)
    bounds = {"max_latency_ms": p.max_latency_ms, "max_params": p.max_params, "costs": costs}
    if not pareto:
        return choose(records, spec.metric, p.top_k, **bounds)
    eligible = choose(records, spec.metric, len(records), **bounds)
    front = pareto_front(eligible, spec.metric, spec.mode, costs=costs)
    if eligible and not front:
        raise UserError(f"--pareto needs each trial's latency_b1_ms, and none of the "
                        f"{len(eligible)} trial(s) that could be promoted has it (a run of an "
                        f"rtft before costs were recorded); allowed: promote without --pareto")
    return front


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


def summary_rows(records: list[TrialRecord], spec: Spec) -> list[dict[str, Any]]:
    """One flat dict per trial, best first: id, state, epochs, best metric, the cost keys
    (when any trial has them; None where one lacks them), every parameter, the error."""
    m = spec.metric
    costs = [k for k in COST_KEYS if any(k in r.cost for r in records)]
    return [{"trial": r.trial_id, "state": trial_state(r, spec.max_t), "epochs": r.epochs,
             f"best_{m}": r.best(m), **{k: r.cost.get(k) for k in costs},
             **{n: r.params.get(n) for n in spec.params}, "error": r.error}
            for r in ranked(records, m)]


def summary_table(records: list[TrialRecord], spec: Spec, limit: int = 10) -> str:
    """The trials sorted by best-so-far metric, as a fixed-width text table."""
    return "\n".join(text_table(*trial_table(records, spec, limit)))


def rung_summary(records: list[TrialRecord], spec: Spec) -> str:
    """How many trials ended at each epoch, and why."""
    counts: dict[str, int] = {}
    for r in records:
        s = trial_state(r, spec.max_t)
        counts[s] = counts.get(s, 0) + 1
    order = sorted(counts, key=lambda s: (s != "completed", s))
    return ", ".join(f"{counts[s]} {s}" for s in order)

