"""`rtft report RUN_DIR`: an HTML page with PNG plots that shows what a search found.

Reads only files in the run folder (`trials.json`, `spec.yaml`, `optuna.journal`, the
promoted model's `metrics.json` if any): no Ray. Plots are written beside `report.html`.
Where the trials recorded their cost, the page also plots the metric against latency at batch
1 with the Pareto front that `rtft promote --pareto` would promote.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from raytune_ft.errors import UserError  # noqa: E402
from raytune_ft.run_folder import open_run  # noqa: E402
from raytune_ft.runs import TrialRecord, read_records, trial_state
from raytune_ft.selection import choose, choose_for, model_costs, ranked
from raytune_ft.spec.schema import METRICS, Spec
from raytune_ft.tables import trial_table

__all__ = ["write_report"]


def _records(run_dir: Path) -> list[TrialRecord]:
    return read_records(run_dir / "trials.json")


def _rungs(spec: Spec) -> list[int]:
    from raytune_ft.space import rung_plan

    return [e for e, _ in rung_plan(spec)] if spec.scheduler.type == "asha" else []


def _curves(records: list[TrialRecord], spec: Spec, out: Path) -> None:
    m = spec.metric
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    cmap = plt.get_cmap("viridis")
    for r in records:
        pts = [(h["epoch"], h[m]) for h in r.history if h.get(m) is not None
               and not h.get("diverged")]
        if not pts:
            continue
        frac = r.epochs / spec.max_t
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1.4, alpha=0.85,
                color=cmap(frac))
    for e in _rungs(spec):
        ax.axvline(e, color="grey", ls="--", lw=0.8)
        ax.text(e, ax.get_ylim()[1], f" rung {e}", va="top", fontsize=8, color="grey")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, spec.max_t))
    fig.colorbar(sm, ax=ax, label="epochs the trial got")
    ax.set(xlabel="epoch", ylabel=m, title=f"Learning curves ({len(records)} trials)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _best_vs_time(records: list[TrialRecord], spec: Spec, out: Path) -> None:
    m, better = spec.metric, METRICS[spec.metric]
    pts = sorted((h["timestamp"], h[m]) for r in records for h in r.history
                 if h.get("timestamp") is not None and h.get(m) is not None
                 and not h.get("diverged"))
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    if pts:
        t0, best, xs, ys = pts[0][0], None, [], []
        for t, v in pts:
            best = v if best is None else (max(best, v) if better == "max" else min(best, v))
            xs.append((t - t0) / 60)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C0")
        ax.scatter([(t - t0) / 60 for t, _ in pts], [v for _, v in pts], s=8, color="C7",
                   alpha=0.6, label="each epoch of each trial")
        ax.legend(loc="lower right", fontsize=8)
    ax.set(xlabel="minutes since the first result", ylabel=f"best {m} so far",
           title="Best so far vs wall time")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _importances(run_dir: Path, spec: Spec, out: Path) -> dict[str, float]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    imp: dict[str, float] = {}
    journal = run_dir / "optuna.journal"
    if journal.exists():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=spec.name,
                                  storage=JournalStorage(JournalFileBackend(str(journal))))
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(done) >= 2:
            try:
                imp = optuna.importance.get_param_importances(study)
            except (RuntimeError, ValueError):  # too few trials or one value only
                imp = {}
    fig, ax = plt.subplots(figsize=(7.5, max(2.0, 0.45 * len(imp) + 1)))
    if imp:
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="C2")
        ax.set(xlabel="importance (fANOVA, Optuna)")
    else:
        ax.text(0.5, 0.5, "not enough completed trials", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Which parameters mattered")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return imp


def _parallel(records: list[TrialRecord], spec: Spec, out: Path, top: int = 10) -> None:
    m = spec.metric
    top_trials = [r for r in ranked(records, m) if r.best(m) is not None][:top]
    names = [n for n, p in spec.params.items() if p.space != "fixed"]
    fig, ax = plt.subplots(figsize=(max(7.5, 1.1 * len(names) + 2), 4.2))
    if top_trials and names:
        def scale(name: str, v: Any) -> float:
            p = spec.params[name]
            if v is None:
                return math.nan
            if p.space == "choice":
                return p.values.index(v) / max(1, len(p.values) - 1)
            lo, hi = float(p.low), float(p.high)
            if p.space == "loguniform" or getattr(p, "log", False):
                lo, hi, v = math.log(lo), math.log(hi), math.log(v)
            return (float(v) - lo) / (hi - lo) if hi > lo else 0.5

        vals = [r.best(m) for r in top_trials]
        norm = plt.Normalize(min(vals), max(vals))
        for r in reversed(top_trials):
            ys = [scale(n, r.params.get(n)) for n in names]
            ax.plot(range(len(names)), ys, marker="o", ms=3,
                    color=plt.get_cmap("plasma")(norm(r.best(m))), lw=1.6, alpha=0.9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks([0, 1], ["low", "high"])
        fig.colorbar(plt.cm.ScalarMappable(cmap="plasma", norm=norm), ax=ax, label=f"best {m}")
    ax.set_title(f"Top {len(top_trials)} trials across the searched parameters")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _cost_plot(records: list[TrialRecord], spec: Spec, out: Path) -> list[TrialRecord]:
    """Best-so-far metric against latency at batch 1, one point per trial (coloured by
    architecture when it is searched), the Pareto front as a step line over its points, and
    `promote.max_latency_ms` as a vertical line. The front is what `rtft promote RUN --pareto`
    promotes (`runs.choose_for`: among the trials promotion chooses from, within promote's
    bounds); trials promotion never takes (stopped early) are drawn hollow.
    Returns the front, cheapest first."""
    m, cost = spec.metric, "latency_b1_ms"
    costs = model_costs(records)  # latency per model (the median of its trials' readings)
    pts = [r for r in records if r.best(m) is not None and cost in costs[r.trial_id]]
    eligible = {r.trial_id for r in choose(records, m, len(records))}
    try:  # the front `rtft promote RUN --pareto` promotes: within promote's bounds too
        front = choose_for(spec, records, pareto=True)
    except UserError:  # no trial fits the bounds: no front to promote, none drawn
        front = []
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    archs = spec.archs
    for i, arch in enumerate(archs):
        mine = [r for r in pts if not spec.arch_searched or r.params.get("arch") == arch]
        full = [r for r in mine if r.trial_id in eligible]
        part = [r for r in mine if r.trial_id not in eligible]
        if full:
            ax.scatter([costs[r.trial_id][cost] for r in full], [r.best(m) for r in full], s=28,
                       color=f"C{i}", alpha=0.85, label=arch)
        if part:  # stopped early (or no checkpoint): not comparable, not promotable
            ax.scatter([costs[r.trial_id][cost] for r in part], [r.best(m) for r in part], s=28,
                       facecolors="none", edgecolors=f"C{i}", alpha=0.85,
                       label=None if full else arch)
    if any(r.trial_id not in eligible for r in pts):  # what the hollow points mean
        ax.scatter([], [], s=28, facecolors="none", edgecolors="grey",
                   label="not promotable (stopped early)")
    if front:
        xs, ys = [costs[r.trial_id][cost] for r in front], [r.best(m) for r in front]
        right = max(costs[r.trial_id][cost] for r in pts)
        ax.step([*xs, right], [*ys, ys[-1]], where="post", color="k", lw=1.2,
                label="Pareto front")
        ax.scatter(xs, ys, s=90, facecolors="none", edgecolors="k", lw=1.4)
        for r in front:
            ax.annotate(r.trial_id, (costs[r.trial_id][cost], r.best(m)), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    if spec.promote.max_latency_ms is not None:
        ax.axvline(spec.promote.max_latency_ms, color="C3", ls="--", lw=1,
                   label=f"promote.max_latency_ms {spec.promote.max_latency_ms:g}")
    lat = [costs[r.trial_id][cost] for r in pts]
    if lat and min(lat) > 0 and max(lat) / min(lat) > 20:
        ax.set_xscale("log")
    ax.set(xlabel="latency at batch 1 (ms; per model: the median of its trials' readings)",
           ylabel=f"best {m}",
           title=f"{m} against latency ({len(front)} trial(s) on the Pareto front)")
    if pts:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return front


def _table(records: list[TrialRecord], spec: Spec) -> str:
    head, rows = trial_table(records, spec)

    def tr(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    return f"<table>{tr(head, 'th')}{''.join(tr(r, 'td') for r in rows)}</table>"


def write_report(run_dir: str | Path, promoted: str | Path | None = None) -> Path:
    """Write `report.html` and its PNGs into `run_dir/report/`; returns the HTML path."""
    run_dir = Path(run_dir)
    spec = open_run(run_dir)
    records = _records(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    _curves(records, spec, out / "curves.png")
    _best_vs_time(records, spec, out / "best_vs_time.png")
    imp = _importances(run_dir, spec, out / "importance.png")
    _parallel(records, spec, out / "parallel.png")
    costs = ""
    if any("latency_b1_ms" in r.cost for r in records):  # runs before costs: no such plot
        front = _cost_plot(records, spec, out / "cost.png")
        ids = ", ".join(r.trial_id for r in front) or "none"
        costs = (f"<h2>Accuracy against latency</h2><p>Pareto front (filled points: trials "
                 f"that reached the highest epoch, which promotion chooses from; "
                 f"<code>rtft promote RUN --pareto</code> promotes each): "
                 f"{html.escape(ids)}.</p><img src=\"cost.png\" alt=\"{spec.metric} against "
                 f"latency at batch 1, with the Pareto front\">")
    states: dict[str, int] = {}
    for r in records:
        s = trial_state(r, spec.max_t)
        states[s] = states.get(s, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    best = next((r for r in ranked(records, spec.metric) if r.best(spec.metric) is not None),
                None)
    promo = ""
    if promoted is None:  # the newest version promoted from this spec, if any
        root = Path(spec.promote.dir).expanduser().resolve() / spec.name
        latest = root / "LATEST"
        promoted = root / latest.read_text().strip() if latest.exists() else None
    if promoted and (Path(promoted) / "metrics.json").exists():
        pm = json.loads((Path(promoted) / "metrics.json").read_text())
        promo = (f"<p class=big>Promoted trial <b>{html.escape(pm['trial_id'])}</b>: "
                 f"validation {spec.metric} {pm['val'][f'best_{spec.metric}']:.4f}, "
                 f"<b>held-out test accuracy {pm['test']['acc']:.4f}</b> "
                 f"({pm['test']['n']} images never seen during the search).</p>")
    top_imp = ", ".join(f"{k} ({v:.2f})" for k, v in list(imp.items())[:3]) or "n/a"
    best_line = (f"Best trial {best.trial_id}: {spec.metric} {best.best(spec.metric):.4f}"
                 if best else "No trial finished an epoch.")
    title = f"{spec.name}: {', '.join(spec.archs)} on {spec.data.source}"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rtft report — {html.escape(spec.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }}
h1 {{ font-size: 1.5em; }} .big {{ font-size: 1.1em; }}
img {{ max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }}
table {{ border-collapse: collapse; font-size: .85em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(records)} trials ({html.escape(summary)}); {spec.searcher.sampler} sampler,
{spec.scheduler.type} scheduler, metric {spec.metric} ({spec.mode}).
{html.escape(best_line)}. Most important parameters: {html.escape(top_imp)}.</p>
{promo}
<h2>Learning curves</h2><img src="curves.png" alt="learning curves">
<h2>Best so far</h2><img src="best_vs_time.png" alt="best so far vs wall time">
<h2>Parameter importance</h2><img src="importance.png" alt="parameter importance">
<h2>Top trials</h2><img src="parallel.png" alt="parallel coordinates of the top trials">
{costs}
<h2>All trials</h2>{_table(records, spec)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
