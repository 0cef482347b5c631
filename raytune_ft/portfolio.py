"""Portfolios: fine-tuning configurations worth trying first on any task. Ray-free.

`searcher.portfolio: builtin | none | PATH`. A portfolio is K configurations of trainer knobs
(:class:`~raytune_ft.knobs.Hyperparams`), chosen offline to do well across several tasks
(AutoGluon's zero-shot portfolios, TabRepo): the shipped one is `portfolio_builtin.json`,
rebuilt from recorded pools by the benchmark (:func:`write`). A new search enqueues them in
its study right after the baseline and the warm start's configurations, and ASHA runs them to
max_t like those (they are references, and good fine-tunes often start slowly).

Each configuration is mapped onto the spec's space as a warm start is
(:func:`raytune_ft.warm_start.fit_to_space`: numbers clipped to their range, choices not
offered and knobs not searched dropped, `when:` and fixed values respected). With a choice
of architectures, configuration i trains architecture i + 1 of the choice, in turn (the
baseline trains the first). A configuration that comes out the same as the baseline or one
before it is tried once.

The file: ``{"configs": [{knob: value, …}, …], "about": "how it was built"}`` (JSON, or the
same in YAML, read as a spec is: duplicate keys refused, `1e-3` a number), or a bare list of
configurations. Unknown knobs, values no knob range allows
and values of the wrong type are refused with one line naming the file and the entry
(`configs[2].lr`), by :func:`load`, before anything is written.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError

from raytune_ft.checkpoint import write_atomic
from raytune_ft.errors import UserError, first_line
from raytune_ft.knobs import Hyperparams
from raytune_ft.spec.schema import Spec
from raytune_ft.warm_start import fit_to_space

__all__ = ["BUILTIN_FILE", "FIELD", "Plan", "Portfolio", "builtin", "check_configs",
           "describe", "load", "plan", "plan_for", "read_for", "write"]

FIELD = "searcher.portfolio"
BUILTIN_FILE = Path(__file__).with_name("portfolio_builtin.json")
_FORM = ("allowed: {configs: [{knob: value, ...}, ...], about: text}, or a list of "
         "{knob: value} (JSON or YAML)")
_NAMES = ("allowed: builtin, none, or the path of a portfolio file (JSON or YAML)")


@dataclass(frozen=True)
class Portfolio:
    """A portfolio as read: its configurations (knob → value, checked), how it was built,
    and where it was read from."""

    configs: list[dict[str, Any]]
    about: str = ""
    source: str = ""


@dataclass
class Plan:
    """A portfolio mapped onto one spec: the configurations to enqueue, in order, and notes
    (what was clipped or dropped, and why a configuration is not tried)."""

    source: str
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading, checking and writing portfolio files
# --------------------------------------------------------------------------------------------
def _bounds(name: str) -> str:
    """What `name` takes, in words: `one of 'sgd', 'adam'`, `a number in (0, 10]`, …"""
    f = Hyperparams.model_fields[name]
    ann = f.annotation
    nullable = get_origin(ann) in (Union, types.UnionType) and type(None) in get_args(ann)
    if nullable:
        ann = next(a for a in get_args(ann) if a is not type(None))
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(map(repr, get_args(ann)))
    lo, hi = "[", ")"
    low: float = -math.inf
    high: float = math.inf
    for m in f.metadata:
        for attr, is_low, bracket in (("gt", True, "("), ("ge", True, "["),
                                      ("lt", False, ")"), ("le", False, "]")):
            v = getattr(m, attr, None)
            if v is not None:
                if is_low:
                    low, lo = v, bracket
                else:
                    high, hi = v, bracket
    kind = "a whole number" if ann is int else "a number"
    where = f" in {lo}{low:g}, {high:g}{hi}" if math.isfinite(low) or math.isfinite(high) \
        else ""
    where = where.replace("[-inf", "(-inf").replace("inf]", "inf)")
    return kind + where + (", or null (the architecture's own)" if nullable else "")


def check_configs(configs: Any, where: str) -> list[dict[str, Any]]:
    """`configs` checked against the trainer's knobs: a list of mappings, every key a knob,
    every value of its type and inside its range. Returns them with the knobs' own types
    (an int given for a float knob becomes a float). Raises :class:`UserError` naming
    `where`, the entry (`configs[2].lr`) and what is allowed."""
    knobs = list(Hyperparams.model_fields)
    if not isinstance(configs, list):
        raise UserError(f"{where}: configs: got {type(configs).__name__}; allowed: a list of "
                        f"{{knob: value}}", field=FIELD)
    out = []
    for i, cfg in enumerate(configs):
        entry = f"{where}: configs[{i}]"
        if not isinstance(cfg, dict):
            raise UserError(f"{entry}: got {_short(cfg)}; allowed: a mapping knob → value",
                            field=FIELD)
        checked: dict[str, Any] = {}
        for name, value in cfg.items():
            if name == "arch":
                raise UserError(f"{entry}.arch: not a knob: the architecture is model.arch "
                                f"(with a choice, the configurations take its architectures "
                                f"in turn); allowed: {', '.join(knobs)}", field=FIELD)
            if name not in knobs:
                near = difflib.get_close_matches(str(name), knobs, n=1)
                hint = f" Did you mean '{near[0]}'?" if near else ""
                raise UserError(f"{entry}.{name}: unknown knob; allowed: {', '.join(knobs)}."
                                f"{hint}", field=FIELD)
            try:  # strict: "0.1" is not a number, true is not 1, 1.0 is not a whole number
                hp = Hyperparams.model_validate({name: value}, strict=True)
            except ValidationError as e:
                raise UserError(f"{entry}.{name}: got {_short(value)}; allowed: "
                                f"{_bounds(name)}", field=FIELD) from e
            checked[name] = getattr(hp, name)
        out.append(checked)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse(data: Any, where: str) -> Portfolio:
    if isinstance(data, list):
        return Portfolio(check_configs(data, where), "", where)
    if not isinstance(data, dict):
        raise UserError(f"{where}: not a portfolio (got {type(data).__name__}); {_FORM}",
                        field=FIELD)
    for key in data:
        if key not in ("configs", "about"):
            raise UserError(f"{where}: unknown key {key!r}; allowed: configs, about",
                            field=FIELD)
    if "configs" not in data:
        raise UserError(f"{where}: no 'configs'; {_FORM}", field=FIELD)
    about = data.get("about", "")
    if not isinstance(about, str):
        raise UserError(f"{where}: about: got {_short(about)}; allowed: text", field=FIELD)
    return Portfolio(check_configs(data["configs"], where), about, where)


@functools.cache
def _yaml_loader() -> type:
    """The spec's strict YAML loader (duplicate keys and non-scalar keys refused), reading a
    plain `1e-3` as the number YAML 1.2 says it is, as the spec accepts it (PyYAML's YAML 1.1
    wants `1.0e-3`). Only unquoted scalars: a quoted "1e-3" stays text, refused for a number
    like any text. Built on first use: a JSON portfolio imports no YAML."""
    from raytune_ft.spec.yaml_io import StrictLoader

    class Loader(StrictLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))
    return Loader


def _read_yaml(text: str, where: str) -> Any:
    """`text` as YAML, read as the spec is read (strict keys, aliases expanded to a bounded
    size); :class:`UserError` naming `where` for anything that is not."""
    import yaml

    from raytune_ft.spec.yaml_io import check_yaml_size

    loader_cls = _yaml_loader()
    try:
        node = yaml.compose(text, Loader=loader_cls)
        check_yaml_size(node)  # an alias bomb is refused before anything is built
        loader = loader_cls("")
        try:
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise UserError(f"{where}: not YAML (nested too deep); {_FORM}", field=FIELD) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"line {mark.line + 1}: " if mark else ""
        problem = " ".join((e.problem or e.context or "invalid YAML").split())
        raise UserError(f"{where}: not YAML ({at}{problem}); {_FORM}", field=FIELD) from e
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not YAML ({' '.join(first_line(e).split())}); {_FORM}",
                        field=FIELD) from e


def load(path: str | Path) -> Portfolio:
    """Read and check a portfolio file (`.json`; anything else is read as YAML, of which JSON
    is a part, with the spec's strict loader). Raises :class:`UserError` (field
    `searcher.portfolio`) when it is missing, unreadable, or not a portfolio of valid knob
    values."""
    p = Path(path).expanduser()
    where = str(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise UserError(f"{where!r} {what}; {_NAMES}", field=FIELD)
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{where}: unreadable ({first_line(e)}); {_FORM}", field=FIELD) from e
    if p.suffix.lower() != ".json":
        data = _read_yaml(text, where)
    return _parse(data, where)


def builtin() -> Portfolio:
    """The portfolio shipped with rtft (`searcher.portfolio: builtin`)."""
    pf = load(BUILTIN_FILE)
    return Portfolio(pf.configs, pf.about, "builtin")


def write(path: str | Path, configs: Sequence[dict[str, Any]], about: str) -> Path:
    """Write a portfolio file (JSON) that :func:`load` reads back: `configs` checked first
    (a bad one raises :class:`UserError` and nothing is written), `about` saying how it was
    built. For the benchmark script that rebuilds the built-in one from recorded pools."""
    p = Path(path)
    checked = check_configs(list(configs), str(p))
    # Atomic: a reader (a search starting) never sees half a file.
    return write_atomic(p, json.dumps({"about": about, "configs": checked}, indent=1) + "\n")


def read_for(spec: Spec) -> Portfolio | None:
    """The portfolio `spec.searcher.portfolio` names, read and checked; None for `none`."""
    name = spec.searcher.portfolio
    if name == "none":
        return None
    return builtin() if name == "builtin" else load(name)


# --------------------------------------------------------------------------------------------
# Onto one spec's space
# --------------------------------------------------------------------------------------------
def plan(spec: Spec, portfolio: Portfolio, *,
         warm: Sequence[dict[str, Any]] = ()) -> Plan:
    """`portfolio` mapped onto `spec`'s space, in its order. A configuration that maps onto
    one the study tries before it (the baseline, when `searcher.baseline_first`; `warm`, the
    warm start's configurations; an earlier one of the portfolio) is not tried again."""
    from raytune_ft.space import baseline_params

    archs = spec.archs
    out = Plan(portfolio.source)
    base = baseline_params(spec) if spec.searcher.baseline_first else None
    taken = [dict(c) for c in warm]
    for i, cfg in enumerate(portfolio.configs):
        params = dict(cfg)
        if spec.arch_searched:  # in turn from the second: the baseline trains the first
            params["arch"] = archs[(i + 1) % len(archs)]
        mapped, changed = fit_to_space(spec, params)
        label = f"portfolio configs[{i}]"
        if not set(mapped) - {"arch"}:
            out.notes.append(f"{label}: nothing of it is searched here; not tried")
            continue
        if mapped == base or mapped in taken:
            what = ("the baseline" if mapped == base else "a warm-start configuration"
                    if taken.index(mapped) < len(warm) else "an earlier configuration")
            out.notes.append(f"{label}: the same as {what} in this space; not tried twice")
            continue
        # One phrase for every knob this space does not search, not one each.
        unsearched = [c.split()[0] for c in changed if c.endswith("(not in this search)")]
        changed = [c for c in changed if not c.endswith("(not in this search)")]
        if unsearched:
            changed.append("not searched here: " + ", ".join(unsearched))
        if changed:
            out.notes.append(f"{label}: " + "; ".join(changed))
        taken.append(mapped)
        out.enqueue.append(mapped)
    return out


def plan_for(spec: Spec, *, warm: Sequence[dict[str, Any]] = ()) -> Plan | None:
    """The portfolio `spec.searcher` asks for, mapped onto its space (None for `none`);
    `warm`: the warm start's configurations, enqueued before it. Reads and checks the file:
    a bad one raises :class:`UserError` here."""
    pf = read_for(spec)
    return None if pf is None else plan(spec, pf, warm=warm)


def describe(p: Plan, spec: Spec, *, first: int = 0) -> list[str]:
    """`rtft validate`'s lines for a portfolio plan: a heading, one line per configuration
    as it will run (its mapped values), the notes. `first`: how many trials the study tries
    before it (baseline, warm start), to say which of them `run.num_samples` leaves out."""
    n = spec.run.num_samples
    after = ("right after the baseline and any warm-start configurations"
             if spec.searcher.baseline_first else "after any warm-start configurations")
    lines = [f"portfolio ({p.source}): {len(p.enqueue)} configuration(s), tried {after}, "
             f"each run to max_t:"]
    for k, cfg in enumerate(p.enqueue):
        values = " ".join(f"{name}={_fmt(v)}" for name, v in cfg.items())
        late = "  (not run: beyond run.num_samples)" if first + k >= n else ""
        lines.append(f"  {k + 1:>2}. {values}{late}")
    lines += [f"  note: {note}" for note in p.notes]
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
