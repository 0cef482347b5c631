"""The Python API: what `rtft search`, `validate`, `results` and `promote` do, as functions that
return data. The CLI is built on these functions (one code path); `raytune_ft` exports them
lazily (`import raytune_ft` imports neither torch, Ray nor pandas).

```python
import raytune_ft as rtft
result = rtft.search("search_spaces/resnet.yaml", overrides=["run.num_samples=6"])
result.trials                       # a pandas DataFrame, one row per trial, best first
result.promoted.model               # the promoted model (a PromotedModel), or None
```

A spec is a path to a YAML file, YAML text, a dict (the YAML's structure) or a
:class:`~raytune_ft.spec.schema.Spec`; `overrides` are `dotted.key=value` strings, as `rtft
--set` takes them. Bad input raises :class:`~raytune_ft.errors.UserError` (the one-paragraph
error the CLI prints), never `SystemExit`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from raytune_ft.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from raytune_ft.preflight import Fit, ModelShape
    from raytune_ft.promote import PromotedModel
    from raytune_ft.runs import Echo, TrialRecord
    from raytune_ft.spec.schema import Spec

__all__ = ["SearchResult", "SpecLike", "Validation", "load_spec", "promote", "read_run",
           "results", "search", "validate"]

# What every function taking a spec accepts: a path (str or PathLike), YAML text, a dict, a Spec.
SpecLike = Union[str, "os.PathLike[str]", Mapping[str, Any], "Spec"]


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------
def _overrides(overrides: Sequence[str] | str) -> tuple[str, ...]:
    return (overrides,) if isinstance(overrides, str) else tuple(overrides)


def _is_path(text: str) -> bool:
    """A one-line string names a file unless it reads as YAML (`key: value`, `{…}`)."""
    if "\n" in text:
        return False
    if text.endswith((".yaml", ".yml")) or Path(text).expanduser().is_file():
        return True
    return not (": " in text or text.rstrip().endswith(":") or text.lstrip().startswith("{"))


def _read(spec: SpecLike, overrides: Sequence[str] | str) -> tuple[Spec, Path | None]:
    """The validated spec and, when it came from a file, that file (for error lines)."""
    from raytune_ft.spec.schema import Spec
    from raytune_ft.spec.yaml_io import load_spec as load_file
    from raytune_ft.spec.yaml_io import parse_spec

    sets = _overrides(overrides)
    if isinstance(spec, Spec):
        if not sets:
            return spec, None
        spec = spec.model_dump(mode="json")
    if isinstance(spec, Mapping):
        # JSON is YAML: the dict goes through the same strict loader and schema as a file.
        try:
            text = json.dumps(dict(spec), default=str)
            return parse_spec(text, file="<dict>", overrides=sets), None
        except UserError as e:
            e.line = None  # the line of a JSON dump the user never saw
            raise
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _is_path(spec)):
        path = Path(os.fspath(spec)).expanduser()
        return load_file(path, sets), path
    if isinstance(spec, str):
        return parse_spec(spec, file="<spec>", overrides=sets), None
    raise UserError(f"a spec is a path, YAML text, a dict or a Spec; got {type(spec).__name__}")


@contextlib.contextmanager
def _located(path: Path | None) -> Iterator[None]:
    """A UserError raised after loading names the spec file and its field's YAML line, as the
    CLI prints it."""
    try:
        yield
    except UserError as e:
        if path is not None:
            from raytune_ft.spec.yaml_io import locate

            locate(e, path)
        raise


def load_spec(spec: SpecLike, overrides: Sequence[str] | str = ()) -> Spec:
    """The validated :class:`~raytune_ft.spec.schema.Spec` of `spec` (a path, YAML text, a dict
    or a Spec) with `overrides` (`"run.num_samples=4"`, …) applied, as `rtft --set` does.

    Raises :class:`~raytune_ft.errors.UserError` naming the file, the YAML line and the field."""
    return _read(spec, overrides)[0]


def _print(line: str) -> None:
    print(line, flush=True)


def _echo(echo: Echo | None) -> Echo:
    """`echo`, or None: print each line. What a search is given is pickled with Ray's Tuner: a
    module's function, never `print` itself (Ray replaces builtins.print in the driver)."""
    if echo is not None:
        return echo
    from raytune_ft.search.run import print_line

    return print_line


# --------------------------------------------------------------------------------------------
# The dry run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Validation:
    """What `rtft validate` found and prints: the spec with overrides applied, the data and the
    weights (one line each), each architecture's stages, how many trials fit at once (None:
    checked once the search joins its cluster), ASHA's rung plan per bracket ((epoch, trials
    expected to reach it), ...; one bracket, stopping nothing, without ASHA), and the portfolio
    as it will run (its lines; None: `searcher.portfolio: none`)."""

    spec: Spec
    data: str
    weights: str
    models: tuple[ModelShape, ...]
    fit: Fit | None
    rungs: tuple[tuple[tuple[int, int], ...], ...]
    portfolio: tuple[str, ...] | None


def validate(spec: SpecLike, overrides: Sequence[str] | str = (), address: str | None = None,
             *, cluster_gpus: float | None = None, cluster_cpus: float | None = None,
             headers: Sequence[str] = ()) -> Validation:
    """The search's dry run (`rtft validate`): every check `search` makes before it starts
    Ray, writing and downloading nothing. How many trials fit is counted on this machine, on a
    cluster of `cluster_gpus` / `cluster_cpus`, or on the running cluster at `address`
    (`auto`, `host:6379`, `ray://…`, or `http://head:8265` with `headers`).

    Raises :class:`~raytune_ft.errors.UserError` on the first problem found."""
    from raytune_ft import preflight
    from raytune_ft.space import rung_plan

    loaded, path = _read(spec, overrides)
    with _located(path):
        on = preflight.machines(loaded, gpus=cluster_gpus, cpus=cluster_cpus, address=address,
                                headers=tuple(headers))
        plan = preflight.dry_run(loaded, on)
    brackets = loaded.scheduler.brackets if loaded.scheduler.type == "asha" else 1
    lines = None
    if plan.portfolio is not None:
        from raytune_ft.portfolio import describe

        lines = tuple(describe(plan.portfolio, loaded, first=plan.before_portfolio))
    return Validation(loaded, plan.data, plan.weights, plan.models, plan.fit,
                      tuple(tuple(rung_plan(loaded, b)) for b in range(brackets)), lines)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def read_run(run_dir: str | os.PathLike[str]) -> tuple[Spec, list[TrialRecord]]:
    """The spec and the trial records of the run in `run_dir`, wherever the folder now is,
    read without Ray when its `trials.json` is current (what `rtft results` prints)."""
    from raytune_ft.run_folder import open_run
    from raytune_ft.search.records import load_records

    spec = open_run(run_dir)
    return spec, load_records(Path(run_dir), spec)


def _frame(records: list[TrialRecord], spec: Spec) -> pd.DataFrame:
    import pandas as pd

    from raytune_ft.tables import summary_rows

    rows = summary_rows(records, spec)
    cols = list(rows[0]) if rows else ["trial", "state", "epochs", f"best_{spec.metric}",
                                       *spec.params, "error"]
    return pd.DataFrame(rows, columns=cols)


def results(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The trials of the run in `run_dir` as a DataFrame, one row per trial, best first (by
    best-so-far metric): `trial`, `state` (completed, stopped@<epoch>, failed, diverged, oom),
    `epochs`, `best_<metric>`, the cost columns the trials recorded (`params`, `flops`,
    `latency_b1_ms`, `latency_b32_ms`, `epoch_s`), every parameter of the space, `error`.
    The same rows as `rtft results --csv`."""
    spec, records = read_run(run_dir)
    return _frame(records, spec)


def promote(run_dir: str | os.PathLike[str], *, pareto: bool = False,
            echo: Echo | None = None) -> list[PromotedModel]:
    """`rtft promote`: promote the best trial(s) of the finished run in `run_dir` again, each
    a new version in the spec's `promote.dir`, within `promote.max_latency_ms` /
    `promote.max_params`; `pareto`: every trial on the accuracy / latency front instead. The
    models, loaded (their folder is `m.metrics["path"]`); empty when no trial has a
    checkpoint. `echo` gets each line `rtft promote` prints (None: print them)."""
    from raytune_ft.promote import load_promoted
    from raytune_ft.search.run import promote_again

    # A bound no trial fits: the line of the run's spec that sets it.
    with _located(Path(run_dir) / "spec.yaml"):
        dirs = promote_again(Path(run_dir), echo=_echo(echo), pareto=pareto)
    return [load_promoted(d) for d in dirs]


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class SearchResult:
    """A finished search: its run folder, its trials (a DataFrame, as :func:`results`), the
    best trial (the promoted one; without a promotion, the first of `trials`; None when no
    trial reported a value), the promoted model (None when nothing was promoted), and every
    promoted model folder (`promote.top_k` of them), the wall time and the spec it ran."""

    run_dir: Path
    trials: pd.DataFrame
    best: dict[str, Any] | None
    promoted: PromotedModel | None
    model_dirs: tuple[Path, ...]
    wall_s: float
    spec: Spec

    def __repr__(self) -> str:
        best = "None" if self.best is None else (
            f"{self.best['trial']} ({self.spec.metric} {self.best[f'best_{self.spec.metric}']})")
        model = str(self.model_dirs[0]) if self.model_dirs else "None"
        return (f"SearchResult(run_dir={str(self.run_dir)!r}, trials={len(self.trials)}, "
                f"best={best}, promoted={model}, wall_s={self.wall_s:.1f})")


def search(spec: SpecLike, *, overrides: Sequence[str] | str = (), address: str | None = None,
           resume: bool = False, echo: Echo | None = None, quiet: bool = False) -> SearchResult:
    """Run the search `spec` describes and promote its best trial (`rtft search`).

    `overrides`: `dotted.key=value` strings (`rtft search --set`). `address`: a Ray cluster to
    join (`auto`, `host:6379`, `ray://host:10001`); default: the Ray this process already runs,
    else a local Ray started for the search and shut down after it (a second search starts
    another). `resume`: continue the interrupted run of this spec. `echo` gets each progress
    line (None: print them, as the CLI does); `quiet`: only one line per finished trial.

    Raises :class:`~raytune_ft.errors.UserError` for a bad spec, an existing run without
    `resume`, a cluster that cannot run a trial, …, before any trial starts."""
    from raytune_ft.promote import load_promoted
    from raytune_ft.search.run import run_search

    loaded, path = _read(spec, overrides)
    with _located(path):
        outcome = run_search(loaded, address=address, echo=_echo(echo), quiet=quiet,
                             resume=resume)
    trials = _frame(outcome.records, loaded)
    model = load_promoted(outcome.promoted[0]) if outcome.promoted else None
    rows = [{k: (None if _missing(v) else v) for k, v in r.items()}
            for r in trials.to_dict("records")]
    if model is not None:
        best = next((r for r in rows if r["trial"] == model.metrics["trial_id"]), None)
    else:  # ranked best first; a trial without a value of the metric is no best trial
        best = rows[0] if rows and rows[0][f"best_{loaded.metric}"] is not None else None
    return SearchResult(outcome.run_dir, trials, best, model, tuple(outcome.promoted),
                        outcome.wall_s, loaded)


def _missing(v: Any) -> bool:
    return isinstance(v, float) and v != v  # NaN: pandas' missing value in a float column
