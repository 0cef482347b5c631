"""From the spec's search parameters (`Spec.params`: `search:`, and `arch` when `model.arch` is
a choice) to Optuna: the define-by-run space, the sampler, the rungs.

An explicit table maps each `space:` name to the Optuna call that samples it; conditional
parameters are sampled only when their condition holds, so Optuna's TPE sees a true
conditional space (and ASHA/Ray never see a parameter that does not apply).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna

from raytune_ft.knobs import Hyperparams, param_order
from raytune_ft.spec.schema import Spec
from raytune_ft.spec.searcher import asha_milestones

__all__ = ["SUGGEST", "baseline_params", "define_by_run", "distribution", "hparams_for",
           "make_sampler", "rung_plan"]

# space name → how Optuna samples it. `fixed` is returned as a constant, not sampled.
SUGGEST: dict[str, Callable[[optuna.Trial, str, Any], Any]] = {
    "loguniform": lambda t, n, p: t.suggest_float(n, p.low, p.high, log=True),
    "uniform": lambda t, n, p: t.suggest_float(n, p.low, p.high),
    "int": lambda t, n, p: t.suggest_int(n, p.low, p.high, log=p.log),
    "choice": lambda t, n, p: t.suggest_categorical(n, p.values),
}


def distribution(p: Any) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution `SUGGEST` samples a (non-fixed) parameter from: for trials
    added to a study from elsewhere (warm starts), which must say where their values lie."""
    d = optuna.distributions
    return {"loguniform": lambda: d.FloatDistribution(p.low, p.high, log=True),
            "uniform": lambda: d.FloatDistribution(p.low, p.high),
            "int": lambda: d.IntDistribution(p.low, p.high, log=p.log),
            "choice": lambda: d.CategoricalDistribution(p.values)}[p.space]()


def active(param: Any, values: dict[str, Any]) -> bool:
    """Whether `param`'s `when:` holds for the parameter `values` chosen so far."""
    for parent, wanted in (param.when or {}).items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if parent not in values or values[parent] not in options:
            return False
    return True


class _DefineByRun:
    """A picklable define-by-run function (Ray pickles the searcher into its run state)."""

    def __init__(self, spec: Spec) -> None:
        # spec.params: `arch` (when searched) has no condition and comes first, so it is
        # sampled before anything a `when: {arch: ...}` gates.
        self.search = spec.params
        self.order = param_order(self.search)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for name in self.order:
            p = self.search[name]
            if not active(p, values):
                continue
            if p.space == "fixed":
                values[name] = constants[name] = p.value
            else:
                values[name] = SUGGEST[p.space](trial, name, p)
        return constants


def define_by_run(spec: Spec) -> Callable[[optuna.Trial], dict[str, Any]]:
    """The function Ray's OptunaSearch calls per trial: samples the active parameters and
    returns the fixed ones (Optuna records only what it sampled)."""
    return _DefineByRun(spec)


def sample_params(spec: Spec, trial: optuna.Trial) -> dict[str, Any]:
    """All active parameter values of one trial (sampled and fixed) — for tests and replays."""
    constants = define_by_run(spec)(trial)
    return {**trial.params, **constants}


def baseline_params(spec: Spec) -> dict[str, Any]:
    """The default knob values that lie inside the searched space, for Optuna to try first.

    Parameters whose default is outside their range/choices, or that are inactive under the
    other defaults (a `when` not met), are left for the sampler. A searched architecture has
    no default: the baseline is the first one the spec lists.
    """
    params = spec.params
    defaults = {**Hyperparams().model_dump(), "arch": spec.archs[0]}
    values: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name in param_order(params):
        p = params[name]
        if not active(p, values):
            continue
        v = defaults[name]
        if p.space == "fixed":
            values[name] = p.value
            continue
        # A knob whose default is None (bn_momentum: the architecture's own) lies in no range.
        inside = (v in p.values if p.space == "choice"
                  else v is not None and p.low <= v <= p.high)
        if inside:
            values[name] = out[name] = v
    return out


def hparams_for(spec: Spec, params: dict[str, Any]) -> Hyperparams:
    """A trial's full knob set: the defaults, overridden by the trial's parameters."""
    return Hyperparams(**{k: v for k, v in params.items() if k in Hyperparams.model_fields})


def make_sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by `searcher.sampler`, seeded."""
    s = spec.searcher
    samplers: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True, group=True,
            constant_liar=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=s.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, warn_independent_sampling=False),
        # GP does not model a conditional (define-by-run) parameter: it samples those at
        # random, which is expected here, not worth a warning per trial.
        "gp": lambda: optuna.samplers.GPSampler(seed=s.seed,
                                                n_startup_trials=s.n_startup_trials,
                                                warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=s.seed, warn_independent_sampling=False),
    }
    return samplers[s.sampler]()


def rung_plan(spec: Spec, bracket: int = 0) -> list[tuple[int, int]]:
    """ASHA's rungs as (epoch, trials expected to reach it), from the first to max_t, of one
    bracket (`scheduler.brackets`: n brackets take the trials in turn, so bracket s gets every
    n-th trial starting at trial s, counting from 0).

    The rungs are Ray's milestones (:func:`~raytune_ft.spec.searcher.asha_milestones`: bracket
    s starts at grace_period × η^s, η the reduction factor); a trial is judged at the first
    epoch that reaches a milestone, ceil(milestone), and a 1/η fraction of the trials at a rung
    goes on to the next. A rung judged only at max_t stops nothing (a trial there has ended),
    so it is not listed; a bracket with no other rung lists only max_t.
    """
    sch = spec.scheduler
    n = spec.run.num_samples
    if sch.type == "none":
        return [(spec.max_t, n)]
    n = len(range(bracket, n, sch.brackets))  # this bracket's turns
    rf = sch.reduction_factor
    epochs = [math.ceil(m) for m in asha_milestones(sch.grace_period, spec.max_t, rf, bracket)]
    epochs = [e for e in epochs if e < spec.max_t]
    plan = [(e, max(1, math.floor(n / rf ** k))) for k, e in enumerate(epochs)]
    plan.append((spec.max_t, max(1, math.floor(n / rf ** len(epochs)))))
    return plan
