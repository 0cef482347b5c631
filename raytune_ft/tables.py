"""The trials of a run as tables: the rows `rtft results`, the search's last lines, the
report and promotion print, text or HTML. Ray-free and torch-free, like :mod:`raytune_ft.runs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raytune_ft.runs import COST_KEYS, TrialRecord, trial_state
from raytune_ft.selection import ranked
from raytune_ft.spec.schema import Spec

__all__ = ["cost_cells", "fmt", "rung_summary", "summary_rows", "summary_table", "text_table",
           "trial_table"]


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


def text_table(head: list[str], rows: list[list[str]], *, rule: bool = True) -> list[str]:
    """Fixed-width lines of a table (header, optional rule, rows)."""
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
             for row in [head, *rows]]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


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
