"""The spec's `searcher:` and `scheduler:` sections: how the search picks configurations and
when it stops trials early. :mod:`raytune_ft.spec.schema` checks them against the rest of the
spec (:func:`check_scheduler` needs `max_t`).

ASHA's rungs are computed here as Ray computes them (:func:`asha_milestones`), without
importing Ray: the spec check and `rtft validate` need them, and neither may import Ray.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from raytune_ft.knobs import FieldError, Strict

__all__ = ["SchedulerSpec", "SearcherSpec", "asha_milestones", "check_scheduler",
           "max_brackets"]


class SearcherSpec(Strict):
    sampler: Literal["tpe", "random", "cmaes", "gp", "qmc"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(5, ge=0)
    # Try the plain defaults first (where the space allows them): the search then never ends
    # below a default fine-tune on the validation metric.
    baseline_first: bool = True
    # What Optuna is told when a trial ends (raytune_ft/fidelity.py): `fidelity` (PRUNED when
    # ASHA stopped it, COMPLETE with its best value at max_t) or Ray's own `last` (COMPLETE
    # with the last value, whatever the epoch).
    telling: Literal["fidelity", "last"] = "fidelity"
    # Earlier run folders or promoted model folders to start from (raytune_ft/warm_start.py):
    # their `warm_start_top` best configurations are tried first; with `warm_start_prior`
    # their trials also join the study as observations (same task and data only: they count
    # as much as new trials).
    warm_start: list[str] = Field(default_factory=list)
    warm_start_top: int = Field(3, ge=1)
    warm_start_prior: bool = False
    # Configurations tried right after the baseline and the warm start, run to max_t
    # (raytune_ft/portfolio.py): `builtin` (shipped with rtft, learned on several fine-tuning
    # tasks), `none`, or a portfolio file (YAML or JSON). `none` by default, so a spec written
    # before portfolios searches as it did; the shipped specs say `builtin`.
    portfolio: str = "none"

    @field_validator("portfolio", mode="before")
    @classmethod
    def _portfolio_named(cls, v: object) -> object:
        allowed = "allowed: builtin, none, or the path of a portfolio file (YAML or JSON)"
        if not isinstance(v, str):  # 3, true, a list: pydantic would only say "valid string"
            got = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise ValueError(f"got {got}; {allowed}")
        if not v.strip():
            raise ValueError(f"empty; {allowed}")
        return v


class SchedulerSpec(Strict):
    type: Literal["asha", "none"] = "asha"
    max_t: int | None = Field(None, ge=1)  # default: train.max_epochs
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, ge=2)
    # ASHA's brackets (Li et al. 2020; Ray's `brackets`): trials take turns; bracket s has its
    # first rung at grace_period * reduction_factor**s, so the last of several may stop nothing
    # before max_t: a hedge for fine-tunes that start slowly. 1: one bracket, Ray's default.
    brackets: int = Field(1, ge=1)


def asha_milestones(grace: float, max_t: float, rf: float, bracket: int) -> list[float]:
    """The rungs (epochs) of ASHA bracket `bracket`, lowest first, as Ray's `_Bracket` makes
    them: grace * rf**(k + bracket) for k < int(log(max_t / grace) / log(rf) - bracket + 1)
    (a rung at max_t stops nothing: a trial there has ended)."""
    n = int(math.log(max_t / grace) / math.log(rf) - bracket + 1)
    return [grace * rf ** (k + bracket) for k in range(max(n, 0))]


def max_brackets(grace: float, max_t: float, rf: float) -> int:
    """The most brackets worth having: one more than bracket 0's rungs judged before max_t
    (a trial is judged at the first epoch that reaches a milestone, ceil(milestone); at max_t
    it has ended). The last one then stops nothing before max_t; any further one would be the
    same again."""
    return sum(math.ceil(m) < max_t for m in asha_milestones(grace, max_t, rf, 0)) + 1


def check_scheduler(sch: SchedulerSpec, max_t: int) -> None:
    """The checks of `scheduler:` that need the spec's `max_t`; raises :class:`FieldError`."""
    if sch.type != "asha":
        if sch.brackets > 1:  # a knob that would do nothing, refused like the others
            raise FieldError(("scheduler", "brackets"),
                             f"{sch.brackets} brackets, but brackets only counts with type: "
                             f"asha, and this spec says type: {sch.type}: it would do nothing; "
                             f"allowed: 1 (or drop it), or scheduler.type: asha")
        return
    if sch.grace_period > max_t:
        raise FieldError(("scheduler", "grace_period"),
                         f"grace_period ({sch.grace_period}) exceeds max_t ({max_t}); "
                         f"allowed: 1..{max_t}")
    top = max_brackets(sch.grace_period, max_t, sch.reduction_factor)
    if sch.brackets > top:
        with_ = (f"with grace_period {sch.grace_period}, reduction_factor "
                 f"{sch.reduction_factor:g} and max_t {max_t}")
        if top == 1:  # grace_period = max_t: ASHA's one rung is where every trial ends
            raise FieldError(("scheduler", "brackets"),
                             f"{sch.brackets} brackets, but one already stops nothing before "
                             f"max_t; allowed: 1 ({with_} there is one rung, at max_t)")
        raise FieldError(("scheduler", "brackets"),
                         f"{sch.brackets} brackets, but {with_} bracket {top - 1} already "
                         f"stops nothing before max_t; allowed: 1..{top}")
