"""Which trials a finished search offers, in what order: the rule promotion applies.

Pure functions over :class:`~raytune_ft.runs.TrialRecord` lists, without Ray or torch:

- :func:`ranked`: every trial, best *best-so-far* metric first (never the last epoch's);
- :func:`model_costs`: each trial's cost, latency the median over trials of the same model;
- :func:`choose`: what promotion takes: a checkpoint, within the bounds, most epochs, best;
- :func:`pareto_front`: the trials no other beats on both metric and latency, cheapest first;
- :func:`choose_for`: :func:`choose` (or the front among what it finds eligible) with a
  spec's `promote:` section.
"""

from __future__ import annotations

import math
from typing import Any

from raytune_ft.errors import UserError
from raytune_ft.runs import TrialRecord
from raytune_ft.spec.schema import METRICS, Spec

__all__ = ["choose", "choose_for", "model_costs", "pareto_front", "ranked"]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _num(v: float) -> str:
    """A bound or a cost in a message: 3 significant digits for floats."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def ranked(records: list[TrialRecord], metric: str) -> list[TrialRecord]:
    """All trials, best-so-far metric first; trials without a value last."""
    sign = -1.0 if METRICS[metric] == "max" else 1.0
    return sorted(records, key=lambda r: (r.best(metric) is None,
                                          sign * (r.best(metric) or 0.0), r.trial_id))


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


def choose(records: list[TrialRecord], metric: str, top_k: int = 1, *,
           max_latency_ms: float | None = None, max_params: int | None = None,
           costs: dict[str, dict[str, float]] | None = None) -> list[TrialRecord]:
    """The trials to promote, best first: among trials with a checkpoint (not diverged) that
    fit the bounds and reached the highest epoch any such trial reached, ranked by best-so-far
    metric.

    Bounds: `max_latency_ms` on the trial's `latency_b1_ms`, `max_params` on its `params`. The
    highest-epoch rule applies among the trials that fit: the best model that fits is chosen,
    even when a bigger one trained longer. A trial without cost data (a run written by rtft
    0.1.0 before costs were recorded) cannot satisfy a bound. When trials could be promoted but
    none fits, raises :class:`UserError` on the bound, with the smallest latency / size seen.
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
        smallest = f"the smallest {key} is {_num(min(seen))}{unit}" if seen else f"none has {key}"
        parts.append(f"{field_name} {_num(bound)}{unit} ({smallest})")
        fields.append(field_name)
    missing = sum(1 for r in ok if not costs[r.trial_id])
    note = (f"; {missing} of them have no cost data (a run written by rtft 0.1.0 before costs "
            f"were recorded) and cannot satisfy a bound" if missing else "")
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
                        f"{len(eligible)} trial(s) that could be promoted has it (a run written "
                        f"by rtft 0.1.0 before costs were recorded); allowed: promote without "
                        f"--pareto")
    return front
