"""Warm starts: what an earlier search (or a promoted model) tells a new one. Ray-free.

`searcher.warm_start: [RUN_DIR or MODEL_DIR, …]` names earlier runs or promoted models.
Their best configurations (`searcher.warm_start_top` per run, best-so-far first, only trials
that trained to their run's end) are enqueued in the new study right after the baseline, so
they are the first trials the new search trains. Values outside this spec's space are clipped
(numbers) or dropped (choices, unknown names), each with a note naming them.

With `searcher.warm_start_prior: true` the earlier trials also enter the study as finished
observations (COMPLETE / PRUNED by the fidelity rule, with their curves as intermediate
values), so the sampler's model starts from them. Optuna's samplers have no per-trial weight:
an observation counts as much as a new trial. That fits "tune again when new data arrives"
(same task, same data fingerprint, only more of it). For a sibling dataset, the earlier values
are on another scale: keep the default (`warm_start_prior: false`), which only enqueues the
configurations, and lets the new task's own results rank them; a note says so when the data
fingerprints differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_ft.errors import UserError
from raytune_ft.fidelity import tell
from raytune_ft.runs import TrialRecord, read_records
from raytune_ft.selection import ranked
from raytune_ft.spec.schema import Spec

FIELD = "searcher.warm_start"
ALLOWED = ("allowed: an rtft run folder (spec.yaml and trials.json, as `rtft search` leaves "
           "it) or a promoted model folder (models/<name>/vN)")


@dataclass(frozen=True)
class Source:
    """One earlier run (or promoted model) as a warm start reads it."""

    path: Path
    metric: str
    max_t: int
    records: list[TrialRecord]
    data: dict[str, Any] | None = None  # the data fingerprint it was trained on


@dataclass
class Plan:
    """What the new study gets: configurations to enqueue, observations, notes to print."""

    enqueue: list[dict[str, Any]] = field(default_factory=list)
    # (configuration, earlier trial, the earlier run's max_t: what "trained in full" meant there)
    observations: list[tuple[dict[str, Any], TrialRecord, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_source(path: str | Path) -> Source:
    """Read an earlier run or promoted model folder; UserError (searcher.warm_start) if it is
    missing or is neither."""
    from raytune_ft.spec.yaml_io import load_spec

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{str(p)!r} does not exist; {ALLOWED}", field=FIELD)
    if not p.is_dir() or not (p / "spec.yaml").is_file():
        raise UserError(f"{str(p)!r} is not an rtft run or model folder (no spec.yaml); "
                        f"{ALLOWED}", field=FIELD)
    try:
        spec = load_spec(p / "spec.yaml")
        if (p / "metrics.json").is_file():  # a promoted model: one configuration
            m = json.loads((p / "metrics.json").read_text())
            best = m["val"][f"best_{m['metric']}"]
            rec = TrialRecord(str(m.get("trial_id", p.name)), dict(m["params"]),
                              [{"epoch": m["epochs"], m["metric"]: best}])
            return Source(p, m["metric"], int(m["epochs"]), _with_arch(spec, [rec]),
                          m.get("data"))
        trials = p / "trials.json"
        if not trials.is_file():
            raise UserError(f"{str(p)!r} has no trials.json: a search still running or "
                            f"interrupted (finish it with `rtft resume {p}`); {ALLOWED}",
                            field=FIELD)
        records = read_records(trials)
        data = (json.loads((p / "data.json").read_text())
                if (p / "data.json").is_file() else None)
    except UserError as e:
        if e.file not in (None, str(p / "spec.yaml")):
            raise
        raise UserError(f"{str(p)!r} is not a readable rtft run or model folder ({e.message}); "
                        f"{ALLOWED}", field=FIELD) from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{str(p)!r} is not a readable rtft run or model folder ({e}); "
                        f"{ALLOWED}", field=FIELD) from e
    return Source(p, spec.metric, spec.max_t, _with_arch(spec, records), data)


def _with_arch(spec: Spec, records: list[TrialRecord]) -> list[TrialRecord]:
    """An earlier run of one architecture trained it in every trial: say so in the trials'
    parameters, so a search over architectures keeps it and a search of another one notes
    the difference."""
    if spec.arch_searched:
        return records
    return [dataclasses.replace(r, params={"arch": spec.model.arch, **r.params})
            for r in records]


def fit_to_space(spec: Spec, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`params` moved into `spec`'s space, walked in the space's own order: numbers clipped to
    their range, choices not offered dropped, names not searched dropped, parameters whose
    `when:` no longer holds dropped (the sampler fills what is missing). A value that differs
    from one this spec fixes counts as a change. Returns the configuration and what changed,
    one phrase each."""
    from raytune_ft.knobs import param_order
    from raytune_ft.space import active

    space = spec.params
    out: dict[str, Any] = {}
    values: dict[str, Any] = {}  # what `when:` sees: the kept values and the fixed ones
    changed = [f"{name} dropped (not in this search)" for name in params
               if name not in space and name != "arch"]
    if not spec.arch_searched and params.get("arch", spec.model.arch) != spec.model.arch:
        changed.append(f"arch={params['arch']!r} differs from this search's "
                       f"{spec.model.arch!r}")
    for name in param_order(space):
        p = space[name]
        if not active(p, values):
            if name in params:
                changed.append(f"{name} dropped (inactive here)")
            continue
        if p.space == "fixed":
            values[name] = p.value
            if name in params and params[name] != p.value:
                changed.append(f"{name}={params[name]!r} differs from this search's fixed "
                               f"{p.value!r}")
            continue
        if name not in params:
            continue
        v = params[name]
        if p.space == "choice":
            if v in p.values:
                out[name] = values[name] = v
            else:
                changed.append(f"{name}={v!r} dropped (not among {p.values})")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            clipped = min(max(v, p.low), p.high)
            if p.space == "int":
                clipped = int(round(clipped))
            if clipped != v:
                changed.append(f"{name}={v:g} clipped to {clipped:g}")
            out[name] = values[name] = clipped
        else:
            changed.append(f"{name}={v!r} dropped (not a number)")
    return out, changed


def plan(spec: Spec, sources: list[Source], *, top: int, prior: bool,
         data: dict[str, Any] | None = None) -> Plan:
    """The warm start of `spec` from `sources` (see the module docstring); `data` is this
    search's data fingerprint, compared with each source's when `prior` is on."""
    searched = {n for n, p in spec.params.items() if p.space != "fixed"}
    out = Plan()
    for src in sources:
        if src.metric != spec.metric:
            raise UserError(f"{str(src.path)!r} optimised {src.metric}, this search optimises "
                            f"{spec.metric}; allowed: earlier runs with metric {spec.metric}",
                            field=FIELD)
        theirs = sorted({k for r in src.records for k in r.params})
        # `arch` is added to every earlier trial (_with_arch): by itself it is nothing shared.
        if not (searched & set(theirs)) - {"arch"} and searched - {"arch"}:
            raise UserError(f"{str(src.path)!r} searched {theirs}, nothing in common with "
                            f"this search's {sorted(searched)}; allowed: a run over some of "
                            f"the same parameters", field=FIELD)
        full = [r for r in src.records if r.epochs >= src.max_t and not r.error]
        for rec in ranked(full, spec.metric)[:top]:
            if rec.best(spec.metric) is None:
                continue
            cfg, changed = fit_to_space(spec, rec.params)
            if changed:
                out.notes.append(f"warm start from {src.path.name} trial {rec.trial_id}: "
                                 + "; ".join(changed))
            if cfg and cfg not in out.enqueue:
                out.enqueue.append(cfg)
        if prior:
            if data is not None and src.data is not None and not _same_data(src.data, data):
                out.notes.append(f"warm start from {src.path.name}: its trials ran on other "
                                 f"data (or other splits of it) and count as much as new ones")
            for rec in src.records:
                cfg, changed = fit_to_space(spec, rec.params)
                if not changed and cfg:  # only trials that lie inside this space, as they ran
                    out.observations.append((cfg, rec, src.max_t))
    return out


def _same_data(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two `data.json` records name the same data: equal fingerprints at any input
    size both record (a run of a `model.arch` choice records one per size: `by_image_size`)."""
    def each(fp: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in fp.items() if k != "by_image_size"},
                *fp.get("by_image_size", {}).values()]

    return any(x == y for x in each(a) for y in each(b))


def plan_for(spec: Spec, *, data: dict[str, Any] | None = None) -> Plan | None:
    """The warm start `spec.searcher` asks for (None when it asks for none); every source is
    read and checked here, so a bad one refuses the search before anything is written."""
    s = spec.searcher
    if not s.warm_start:
        return None
    return plan(spec, [read_source(p) for p in s.warm_start], top=s.warm_start_top,
                prior=s.warm_start_prior, data=data)


def told(rec: TrialRecord, metric: str, max_t: int) -> tuple[str, float | None, dict[int, float]]:
    """How an earlier trial enters the study: (state, value, intermediate values)."""
    curve = {int(h["epoch"]): float(h[metric]) for h in rec.history
             if h.get(metric) is not None and math.isfinite(h[metric])}
    last = rec.history[-1] if rec.history else None
    result = None if last is None else {
        "training_iteration": rec.epochs, metric: last.get(metric),
        f"best_{metric}": rec.best(metric), "diverged": rec.diverged}
    t = tell(result, error=bool(rec.error), metric=metric, max_t=max_t)
    return t.state, t.value, curve


def frozen_trial(spec: Spec, cfg: dict[str, Any], rec: TrialRecord, max_t: int) -> Any:
    """An earlier trial as an Optuna FrozenTrial of this study (for `study.add_trial`); COMPLETE
    or PRUNED by what `max_t` was in its own run."""
    import optuna

    from raytune_ft.space import distribution

    state, value, curve = told(rec, spec.metric, max_t)
    return optuna.trial.create_trial(
        params=cfg, distributions={n: distribution(spec.params[n]) for n in cfg},
        value=value, state=optuna.trial.TrialState[state], intermediate_values=curve,
        user_attrs={"warm_start": rec.trial_id})
