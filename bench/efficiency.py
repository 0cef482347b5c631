"""Search efficiency: how much compute each searcher needs to reach a good model.

    python bench/efficiency.py                 # record the pools once (resumable), then the rest
    python bench/efficiency.py --record-only   # only record the learning curves (background job)
    python bench/efficiency.py --recorded-only --parts replay,sweep   # replay what is recorded
    python bench/efficiency.py --smoke         # seconds: tiny pools, 2 seeds, no live run

How it works (the way Syne Tune's simulator and tabular benchmarks do it):

1. **Record** learning curves once with our real ``train()`` (1 thread per trial, 2 at a time),
   8 epochs each, into ``bench/results/efficiency_pool_e8.jsonl`` (committed; a missing or
   partial file is completed, never redone): the default space on the default task, the large
   space with every knob, and the default space on a sibling task (the warm-start source). A
   curve stopped at epoch k is exactly what a trial stopped there would have seen: the LR
   schedule depends on ``max_epochs`` only.
2. **Replay** searches through the REAL code: our ``FidelityOptunaSearch`` (fidelity-aware or
   Ray's "last" telling) with ``define_by_run`` and ``make_sampler``, our ``PersistentASHA`` or
   Ray's ``FIFOScheduler``, driven by a discrete-event loop with 2 trials in flight, called in
   TuneController's order. A sampled configuration is mapped to the nearest pool configuration.
   Replays leave out the baseline-first trial (the same for every method: it would measure the
   baseline, not the searcher).
3. Every method gets the same budget of trained epochs; reported: epochs and simulated seconds
   until a trial reports a val_acc within GOOD_PP (and LOOSE_PP) of the pool's best, and the
   regret at the end of the budget; best-so-far curves are plotted (results/efficiency.png).
4. A sweep of n_startup_trials × grace_period × reduction_factor for the default spec.
5. One **live** ``run_search`` (8 trials) checks the replay against real training.
6. The searcher's work per trial (ask, intermediate values, the fidelity-aware tell, journal
   storage) at 100, 1,000 and 5,000 trials.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

# Runnable from a checkout without `pip install -e .`: the repository root and bench/.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from _common import (  # noqa: E402
    DEFAULT_SPEC,
    RESULTS,
    SMOKE_OVERRIDES,
    Results,
    load_average,
    median,
    table,
)

from raytune_ft.spec.schema import Spec  # noqa: E402
from raytune_ft.spec.yaml_io import load_spec, parse_spec  # noqa: E402

# Every fine-tuning knob the trainer implements, searched at once ("the harder setting").
LARGE_SEARCH = {
    "lr": {"space": "loguniform", "low": 1.0e-4, "high": 3.0e-2},
    "optimizer": {"space": "choice", "values": ["sgd", "adam", "adamw"]},
    "momentum": {"space": "uniform", "low": 0.8, "high": 0.99, "when": {"optimizer": "sgd"}},
    "weight_decay": {"space": "loguniform", "low": 1.0e-6, "high": 1.0e-2},
    "backbone_lr_mult": {"space": "loguniform", "low": 0.01, "high": 1.0},
    "freeze_depth": {"space": "int", "low": 0, "high": 5},
    "unfreeze_at_epoch": {"space": "int", "low": 0, "high": 3},
    "init": {"space": "choice",
             "values": ["default", "kaiming_normal", "xavier_uniform", "orthogonal",
                        "trunc_normal"]},
    "reinit_blocks": {"space": "int", "low": 0, "high": 2},
    "activation": {"space": "choice", "values": ["relu", "gelu", "silu", "mish"]},
    "activation_scope": {"space": "choice", "values": ["head", "all"]},
    "head_hidden": {"space": "choice", "values": [0, 128, 256]},
    "head_dropout": {"space": "uniform", "low": 0.0, "high": 0.5},
    "batch_size": {"space": "choice", "values": [32, 64]},
    "label_smoothing": {"space": "uniform", "low": 0.0, "high": 0.2},
    "warmup_epochs": {"space": "uniform", "low": 0.0, "high": 1.0},
    "augment": {"space": "choice", "values": ["none", "light", "strong"]},
    "grad_clip": {"space": "choice", "values": [0.0, 1.0]},
}
METHODS = {  # name → (sampler, scheduler, telling, warm-started from the sibling pool)
    "random full": ("random", "none", "last", False),
    "random+asha": ("random", "asha", "last", False),
    "tpe+asha (ray: last)": ("tpe", "asha", "last", False),
    "tpe+asha": ("tpe", "asha", "fidelity", False),
    "gp+asha": ("gp", "asha", "fidelity", False),
    "cmaes+asha": ("cmaes", "asha", "fidelity", False),
    "tpe+asha warm": ("tpe", "asha", "fidelity", True),
}
# What bench/transfer.py writes into the same efficiency.json (kept when this script runs).
TRANSFER_KEYS = ("tasks", "average", "chosen", "choice_sweep", "builtin_portfolio", "levels",
                 "transfer_settings", "transfer_load", "transfer_wall_s",
                 "transfer_pool_recording_load")
WARM_TOP = 3  # configurations a warm start enqueues from the earlier run (searcher.warm_start_top)
# The comparison replays run without rtft's baseline-first trial: the baseline is the same
# first trial for every method (and in this pool it is nearly the best configuration), so it
# would measure the baseline, not the searcher. The live check keeps it, as rtft runs.
REPLAY_BASELINE = False
GOOD_PP = 0.005  # "good": within 0.5 pp of the pool's best val_acc (1 image of 359 here)
# GP's fit grows with the trials (a minute a replay on 2 cores): fewer seeds for it.
GP_SEEDS = 8
LOOSE_PP = 0.01  # a second, looser target, reported beside it (3 images of 359)
START_S = 1.0  # simulated per-trial start-up (bench/overhead.py measures ours)


# --------------------------------------------------------------------------------------------
# Specs: the default task with its own space, and with every knob searched
# --------------------------------------------------------------------------------------------
def spaces(smoke: bool, max_epochs: int = 8) -> dict[str, Spec]:
    """The pools' spaces, all at `max_epochs` (rungs 1, 2, 4, 8 at the default 8):

    - 'default': resnet.yaml's own space on its task (digits);
    - 'large': every fine-tuning knob searched at once, same task;
    - 'sibling': resnet.yaml's space on a sibling task, the source of the warm-start
      experiments: other digits (split_seed 1) and half the training images (250). (The
      `mnist` source would be the same 5,000 images the rtft:mnist backbone was pretrained
      on: an easy task whose curves say little.)

    In smoke mode: the tiny task, 2 epochs."""
    # One bracket, as these pools' single-task benchmark was run (bench/transfer.py sets the
    # brackets of each method it compares).
    overrides = (SMOKE_OVERRIDES + ["train.max_epochs=2"] if smoke
                 else [f"train.max_epochs={max_epochs}", "scheduler.brackets=1"])
    default = load_spec(DEFAULT_SPEC, overrides)
    raw = yaml.safe_load(DEFAULT_SPEC.read_text())
    raw["search"] = LARGE_SEARCH
    if smoke:
        raw["search"]["unfreeze_at_epoch"] = {"space": "int", "low": 0, "high": 1}
    large = parse_spec(yaml.safe_dump(raw), file="large-space", overrides=overrides)
    sibling = load_spec(DEFAULT_SPEC, [*overrides, "data.split_seed=1",
                                       *([] if smoke else ["data.train_limit=250"])])
    tasks = {"default": default, "large": large, "sibling": sibling}
    # Tasks that change what the best recipe is, same space (so configuration i is the same
    # draw in every pool), the digits source only: mnist stays out, a data set none of the
    # pools saw for the live check.
    for name, extra in TASKS.items():
        tasks[name] = load_spec(DEFAULT_SPEC, [*overrides, *extra])
    return tasks


# The default space on other tasks (issue 23): another family, far fewer images, no pretraining.
TASKS = {
    # mobilenet_v3_small from rtft:mnist; its own BatchNorm momentum (0.01) leaves the running
    # statistics at the pretraining data's after a trial's few steps, so 0.1 as which_model.yaml.
    "mobilenet": ["model.arch=mobilenet_v3_small", "search.bn_momentum=0.1"],
    "few100": ["data.train_limit=100"],
    "scratch": ["model.weights=none"],
}


def with_method(spec: Spec, sampler: str, scheduler: str, seed: int) -> Spec:
    """`spec` with the searcher's sampler and seed and the scheduler type replaced."""
    return spec.model_copy(update={
        "searcher": spec.searcher.model_copy(update={"sampler": sampler, "seed": seed}),
        "scheduler": spec.scheduler.model_copy(update={"type": scheduler})})


# --------------------------------------------------------------------------------------------
# 1. Recording the pool
# --------------------------------------------------------------------------------------------
def pool_params(spec: Spec, n: int, seed: int, baseline: bool) -> list[dict[str, Any]]:
    """`n` configurations of `spec`'s space: the baseline first (if asked), then random draws
    through the same define-by-run function the search uses."""
    import optuna

    from raytune_ft.space import baseline_params, sample_params

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    if baseline:
        study.enqueue_trial(baseline_params(spec))
    out = []
    for _ in range(n):
        t = study.ask()
        out.append(sample_params(spec, t))
        study.tell(t, 0.0)
    return out


_WORKER_DATA: dict[str, Any] = {}


def _record_one(spec_json: dict, params: dict[str, Any]) -> dict[str, Any]:
    """In a worker process: train one configuration, return its per-epoch curve."""
    import torch

    from raytune_ft.data import prepare
    from raytune_ft.model.pretrain import ensure_backbone
    from raytune_ft.space import hparams_for
    from raytune_ft.train import train

    torch.set_num_threads(1)
    spec = Spec.model_validate(spec_json)
    key = json.dumps(spec_json["data"], sort_keys=True)
    if key not in _WORKER_DATA:
        ensure_backbone(spec, echo=lambda s: None)
        _WORKER_DATA[key] = prepare(spec.data)
    curve: list[dict[str, Any]] = []
    last = [time.perf_counter()]

    def report(m: dict[str, Any], folder: Any) -> None:
        now = time.perf_counter()
        curve.append({"epoch": m["epoch"], "val_acc": m["val_acc"], "val_loss": m["val_loss"],
                      "seconds": round(now - last[0], 3), "diverged": m["diverged"]})
        last[0] = now

    t0 = time.perf_counter()
    error = None
    try:
        train(hparams_for(spec, params), spec=spec, data=_WORKER_DATA[key], report=report,
              num_threads=1, checkpoints=False)
    except Exception as e:  # a failed configuration is part of the pool, as in a search
        error = f"{type(e).__name__}: {e}"
    return {"params": params, "curve": curve, "error": error,
            "seconds": round(time.perf_counter() - t0, 2)}


def record_pool(path: Path, specs: dict[str, Spec], sizes: dict[str, int],
                workers: int) -> dict[str, list[dict[str, Any]]]:
    """Record (or complete) the pool in `path`, a JSON-lines file; returns {space: entries}."""
    from raytune_ft.model.pretrain import ensure_backbone

    want = {name: pool_params(spec, sizes[name], seed=1234, baseline=True)
            for name, spec in specs.items()}
    have: dict[tuple[str, int], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                e = json.loads(line)
                have[(e["space"], e["index"])] = e
    todo = [(name, i, p) for name, ps in want.items() for i, p in enumerate(ps)
            if (name, i) not in have or have[(name, i)]["params"] != p]
    # Interleaved: a recording stopped part-way leaves every space's first configurations.
    todo.sort(key=lambda job: (job[1] / max(1, len(want[job[0]])), job[0]))
    if todo:
        for name in {name for name, _, _ in todo}:  # once, here: not raced by two workers
            ensure_backbone(specs[name])
        print(f"recording {len(todo)} learning curves into {path} ({workers} at a time)",
              flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs = [(specs[name].model_dump(mode="json"), p) for name, _, p in todo]
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(open(path, "a"))
            if workers > 1:
                ex = stack.enter_context(ProcessPoolExecutor(workers,
                                                             mp_context=get_context("spawn")))
                results: Any = ex.map(_record_one, *zip(*jobs, strict=False))
            else:  # in this process: no worker start-up (--smoke)
                results = (_record_one(*job) for job in jobs)
            for k, ((name, i, _), got) in enumerate(zip(todo, results, strict=False)):
                e = {"space": name, "index": i, **got}
                f.write(json.dumps(e) + "\n")
                f.flush()  # resumable: every finished curve is on disk at once
                have[(name, i)] = e
                best = max((c["val_acc"] for c in e["curve"]), default=float("nan"))
                print(f"  [{k + 1}/{len(todo)}] {name} #{i}: best val_acc {best:.4f} "
                      f"in {e['seconds']:.0f} s", flush=True)
    return {name: [have[(name, i)] for i in range(len(ps))] for name, ps in want.items()}


def recorded_prefix(path: Path, spec: Spec, space: str) -> int:
    """How many of the space's pool configurations, from the first, are recorded in `path`."""
    if not path.exists():
        return 0
    done = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e["space"] == space:
            done[e["index"]] = e["params"]
    want = pool_params(spec, max(done, default=-1) + 1, seed=1234, baseline=True)
    n = 0
    while n < len(want) and done.get(n) == want[n]:
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# 2. Replay through Ray's OptunaSearch + our ASHA
# --------------------------------------------------------------------------------------------
class Nearest:
    """Maps a configuration of `spec`'s space to the nearest pool entry."""

    def __init__(self, spec: Spec, pool: list[dict[str, Any]]) -> None:
        self.search = {n: p for n, p in spec.search.items() if p.space != "fixed"}
        self.pool = pool
        self.vecs = [self._vec(e["params"]) for e in pool]

    def _vec(self, params: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for name, p in self.search.items():
            v = params.get(name)
            if v is None:
                out.append(None)
            elif p.space == "choice":
                out.append(("c", v))
            elif p.space == "loguniform" or (p.space == "int" and p.log):
                out.append(math.log(max(v, 1e-12) / p.low) / math.log(p.high / p.low))
            else:
                out.append((v - p.low) / (p.high - p.low))
        return out

    def __call__(self, params: dict[str, Any]) -> int:
        v = self._vec(params)

        def dist(w: list[Any]) -> float:
            d = 0.0
            for a, b in zip(v, w, strict=False):
                if a is None or b is None or isinstance(a, tuple):
                    d += 0.0 if a == b else 1.0
                else:
                    d += (a - b) ** 2
            return d

        return min(range(len(self.vecs)), key=lambda i: dist(self.vecs[i]))


def pool_records(pool: list[dict[str, Any]]) -> list[Any]:
    """A recorded pool as the TrialRecords an earlier rtft run would have left."""
    from raytune_ft.runs import TrialRecord

    return [TrialRecord(f"p{i:04d}", dict(e["params"]),
                        [{"epoch": c["epoch"], "val_acc": c["val_acc"], "val_loss": c["val_loss"],
                          "best_val_acc": max(x["val_acc"] for x in e["curve"][:k + 1]),
                          "diverged": c["diverged"]} for k, c in enumerate(e["curve"])],
                        None, e["error"])
            for i, e in enumerate(pool)]


def replay(spec: Spec, pool: list[dict[str, Any]], method: str | tuple, seed: int, *,
           budget_epochs: int | None = None, num_trials: int | None = None,
           concurrency: int = 2, warm_from: list[dict[str, Any]] | None = None,
           baseline: bool | None = None, knobs: dict[str, Any] | None = None,
           portfolio: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One simulated search: the trace of (epochs so far, simulated seconds, val_acc).

    `method`: a name of METHODS, or such a tuple (sampler, scheduler, telling, warm).
    `knobs`: searcher and scheduler fields to set (n_startup_trials, grace_period,
    reduction_factor, brackets). `portfolio`: configurations mapped onto the space by
    `raytune_ft.portfolio.plan` and enqueued after the baseline and warm start, protected
    from early stopping, as `run_search` does with `searcher.portfolio`."""
    import numpy as np
    import optuna
    from ray.tune.schedulers import FIFOScheduler

    from raytune_ft import warm_start
    from raytune_ft.search.schedulers import PersistentASHA
    from raytune_ft.search.searcher import FidelityOptunaSearch
    from raytune_ft.space import baseline_params, define_by_run, make_sampler

    sampler_name, sched_type, telling, warm = (METHODS[method] if isinstance(method, str)
                                               else method)
    s = with_method(spec, sampler_name, sched_type, seed)
    if baseline is not None:
        s = s.model_copy(update={"searcher": s.searcher.model_copy(
            update={"baseline_first": baseline})})
    if knobs:  # the defaults sweep: n_startup_trials, grace_period, reduction_factor
        s = s.model_copy(update={
            "searcher": s.searcher.model_copy(update={
                k: v for k, v in knobs.items() if k in type(s.searcher).model_fields}),
            "scheduler": s.scheduler.model_copy(update={
                k: v for k, v in knobs.items() if k in type(s.scheduler).model_fields})})
    np.random.seed(seed)  # ASHA's bracket draw uses numpy's global RNG (one bracket: no-op)
    storage = optuna.storages.InMemoryStorage()
    study_name = f"replay-{seed}"
    study = optuna.create_study(study_name=study_name, storage=storage,
                                direction="maximize" if s.mode == "max" else "minimize")
    if s.searcher.baseline_first:
        study.enqueue_trial(baseline_params(s), skip_if_exists=True)
    protect = int(s.searcher.baseline_first)
    if warm and warm_from:  # the earlier run's best, as searcher.warm_start enqueues them
        src = warm_start.Source(Path("sibling"), s.metric, s.max_t, pool_records(warm_from))
        for cfg in warm_start.plan(s, [src], top=WARM_TOP, prior=False).enqueue:
            study.enqueue_trial(cfg, skip_if_exists=True)
            protect += 1  # run to max_t, as run_search protects them
    if portfolio:
        from raytune_ft import portfolio as pf

        for cfg in pf.plan(s, pf.Portfolio(list(portfolio), source="replay")).enqueue:
            study.enqueue_trial(cfg, skip_if_exists=True)
    # As run_search counts them: the configurations waiting in the new study run to max_t.
    protect = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    searcher = FidelityOptunaSearch(space=define_by_run(s), sampler=make_sampler(s),
                                    metric=s.metric, mode=s.mode, storage=storage,
                                    study_name=study_name, max_t=s.max_t, telling=telling)
    tmp = tempfile.TemporaryDirectory(prefix="rtft-replay-")
    if sched_type == "asha":
        scheduler: Any = PersistentASHA(
            Path(tmp.name), protect_first=protect,
            time_attr="training_iteration", max_t=s.max_t, metric=s.metric, mode=s.mode,
            grace_period=s.scheduler.grace_period, reduction_factor=s.scheduler.reduction_factor,
            brackets=s.scheduler.brackets)
    else:
        scheduler = FIFOScheduler()
    nearest = Nearest(s, pool)
    now, epochs, started = 0.0, 0, 0
    running: dict[str, dict[str, Any]] = {}  # trial id → {trial, curve, epoch, t_next}
    trace: list[tuple[int, float, float]] = []
    picked: list[int] = []
    started_at: list[int] = []  # trials started when each trace point was reported

    def can_start() -> bool:
        if num_trials is not None:
            return started < num_trials
        return epochs < budget_epochs  # type: ignore[operator]

    while True:
        while len(running) < concurrency and can_start():
            tid = f"t{started:04d}"
            started += 1
            cfg = searcher.suggest(tid)
            idx = nearest(cfg)
            picked.append(idx)
            trial = SimpleNamespace(trial_id=tid, config=cfg)
            scheduler.on_trial_add(None, trial)
            curve = pool[idx]["curve"]
            running[tid] = {"trial": trial, "curve": curve, "epoch": 0,
                            "t_next": now + START_S + (curve[0]["seconds"] if curve else 0)}
        if not running:
            break
        tid, r = min(running.items(), key=lambda kv: kv[1]["t_next"])
        now = r["t_next"]
        curve = r["curve"]
        if not curve:  # a configuration that failed before its first epoch
            searcher.on_trial_complete(tid, error=True)
            scheduler.on_trial_remove(None, r["trial"])
            del running[tid]
            continue
        point = curve[r["epoch"]]
        r["epoch"] += 1
        epochs += 1
        best = max(c["val_acc"] for c in curve[:r["epoch"]])
        result = {"training_iteration": r["epoch"], "epoch": r["epoch"],
                  "val_acc": point["val_acc"], "val_loss": point["val_loss"],
                  "best_val_acc": best, "diverged": point.get("diverged", False)}
        trace.append((epochs, now, point[s.metric]))
        started_at.append(started)
        action = scheduler.on_trial_result(None, r["trial"], result)
        last = r["epoch"] >= len(curve) or point.get("diverged")
        if action == "STOP" or last:  # as Ray's controller: the last result only completes
            scheduler.on_trial_complete(None, r["trial"], result)
            searcher.on_trial_complete(tid, result=result)
            del running[tid]
        else:
            searcher.on_trial_result(tid, result)
            r["t_next"] = now + curve[r["epoch"]]["seconds"]
    states = [t.state.name for t in study.trials]
    tmp.cleanup()
    return {"trace": trace, "trials": started, "epochs": epochs, "seconds": now,
            "started_at": started_at,
            "distinct_configs": len(set(picked)),
            "told": {k: states.count(k) for k in ("COMPLETE", "PRUNED", "FAIL")}}


def to_target(trace: list[tuple[int, float, float]], target: float) -> tuple[float, float]:
    """(epochs, simulated seconds) until a reported value reaches `target`; inf if never."""
    for e, t, v in trace:
        if v >= target:
            return float(e), t
    return math.inf, math.inf


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles; inf where more than that share never got there."""
    import numpy as np

    if not xs:
        return (math.nan,) * 3  # type: ignore[return-value]
    a = np.array(xs, dtype=float)
    return tuple(float(np.percentile(a, q, method="lower")) for q in (25, 50, 75))  # type: ignore[return-value]


def best_so_far(trace: list[tuple[int, float, float]], budget: int) -> list[float]:
    """The best value reported after each of `budget` epochs (NaN before the first)."""
    out, best, k = [], -math.inf, 0
    for e in range(1, budget + 1):
        while k < len(trace) and trace[k][0] <= e:
            best = max(best, trace[k][2])
            k += 1
        out.append(best if best > -math.inf else math.nan)
    return out


def _replay_job(job: tuple) -> dict[str, Any]:
    """One replay in a worker process (replays are independent: seeds × methods)."""
    spec_json, pool, method, seed, budget, warm_from, *knobs = job
    warnings.filterwarnings("ignore")
    return replay(Spec.model_validate(spec_json), pool, method, seed, budget_epochs=budget,
                  warm_from=warm_from, baseline=REPLAY_BASELINE,
                  knobs=knobs[0] if knobs else None)


def defaults_sweep(spec: Spec, pool: list[dict[str, Any]], seeds: int, budget_trials: int,
                   workers: int) -> list[dict[str, Any]]:
    """Fidelity-aware TPE+ASHA on the default space over n_startup_trials × grace_period ×
    reduction_factor: epochs, and trials started, until within GOOD_PP of the pool's best."""
    import itertools

    pool_best = max(c["val_acc"] for e in pool for c in e["curve"])
    budget = budget_trials * spec.max_t
    grid = [{"n_startup_trials": n, "grace_period": g, "reduction_factor": r}
            for n, g, r in itertools.product((4, 6, 10), (1, 2), (2, 3, 4))]
    jobs = [(spec.model_dump(mode="json"), pool, "tpe+asha", seed, budget, None, k)
            for k in grid for seed in range(seeds)]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            rs = list(ex.map(_replay_job, jobs))
    else:
        rs = [_replay_job(j) for j in jobs]
    out = []
    for i, k in enumerate(grid):
        mine = rs[i * seeds:(i + 1) * seeds]
        hits = []
        for r in mine:
            e, _ = to_target(r["trace"], pool_best - GOOD_PP)
            n = (r["started_at"][int(e) - 1] if math.isfinite(e) else math.inf)
            hits.append((e, n))
        loose = [to_target(r["trace"], pool_best - LOOSE_PP)[0] for r in mine]
        out.append({**k, "median_epochs": median([h[0] for h in hits]),
                    "median_trials_started": median([h[1] for h in hits]),
                    "reached": sum(math.isfinite(h[0]) for h in hits),
                    "median_epochs_loose": median(loose),
                    "reached_loose": sum(math.isfinite(x) for x in loose),
                    "regret_median": median([pool_best - max(v for _, _, v in r["trace"])
                                             for r in mine])})
    return sorted(out, key=lambda r: (-r["reached"], r["median_epochs"], -r["reached_loose"],
                                      r["median_epochs_loose"], r["regret_median"]))


def efficiency_tables(specs: dict[str, Spec], pools: dict[str, list[dict]], seeds: int,
                      budget_trials: int, workers: int = 1,
                      methods: list[str] | None = None) -> dict[str, Any]:
    """Replay every method × seed on the default and large spaces: epochs and simulated
    seconds to within GOOD_PP of the pool's best, and the regret when the budget is spent."""
    out: dict[str, Any] = {}
    for name in [n for n in ("default", "large") if n in specs]:
        spec, pool = specs[name], pools[name]
        budget = budget_trials * spec.max_t
        pool_best = max(c["val_acc"] for e in pool for c in e["curve"])
        target = pool_best - GOOD_PP
        rows, curves = {}, {}
        chosen = [m for m in methods or METHODS
                  if not (METHODS[m][3] and not pools.get("sibling"))]  # warm: needs a source
        jobs = [(spec.model_dump(mode="json"), pool, m, seed, budget, pools.get("sibling"))
                for m in chosen
                for seed in range(min(seeds, GP_SEEDS) if METHODS[m][0] == "gp" else seeds)]
        t0 = time.perf_counter()
        if workers > 1:  # one pool of processes for all: each imports Ray and torch once
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
                done = list(ex.map(_replay_job, jobs))
        else:
            done = [_replay_job(j) for j in jobs]
        print(f"  {name}: {len(jobs)} replays in {time.perf_counter() - t0:.0f} s", flush=True)
        for m in chosen:
            rs = [r for j, r in zip(jobs, done, strict=True) if j[2] == m]
            hits = [to_target(r["trace"], target) for r in rs]
            loose = [to_target(r["trace"], pool_best - LOOSE_PP)[0] for r in rs]
            ends = [max(v for _, _, v in r["trace"][:budget]) for r in rs]
            rows_seeds = len(rs)
            ep, sec = quartiles([h[0] for h in hits]), quartiles([h[1] for h in hits])
            rows[m] = {"epochs_to_good": [h[0] for h in hits],
                       "seconds_to_good": [round(h[1], 1) for h in hits],
                       "epochs_q25_median_q75": ep, "seconds_q25_median_q75": sec,
                       "median_epochs": ep[1], "median_seconds": sec[1],
                       "reached": sum(math.isfinite(h[0]) for h in hits),
                       "epochs_to_loose_q25_median_q75": quartiles(loose),
                       "reached_loose": sum(math.isfinite(x) for x in loose),
                       "regret_median": median([pool_best - b for b in ends]),
                       "regret_q75": quartiles([pool_best - b for b in ends])[2],
                       "trials": median([r["trials"] for r in rs]),
                       "distinct_configs": median([r["distinct_configs"] for r in rs]),
                       "told": {k: median([r["told"][k] for r in rs])
                                for k in ("COMPLETE", "PRUNED", "FAIL")},
                       "seeds": rows_seeds}
            per_seed = [best_so_far(r["trace"], budget) for r in rs]
            curves[m] = [median([c[e] for c in per_seed if not math.isnan(c[e])])
                         for e in range(budget)]
            print(f"  {name}: {m}: median {ep[1]} epochs to good ({rows[m]['reached']}/"
                  f"{len(rs)} reached)", flush=True)
        for ref_name, key in (("random full", "vs_random_full"), ("random+asha", "vs_random_asha"),
                              ("tpe+asha", "vs_cold_tpe")):
            ref = rows.get(ref_name, {}).get("median_epochs", math.nan)
            for r in rows.values():
                r[key] = (r["median_epochs"] / ref
                          if math.isfinite(ref) and ref > 0 and math.isfinite(r["median_epochs"])
                          else None)
        out[name] = {"pool_size": len(pool), "pool_best": pool_best, "target": target,
                     "budget_epochs": budget, "seeds": seeds, "methods": rows,
                     "best_so_far_median": curves}
    return out


def plot_curves(eff: dict[str, Any], path: Path) -> None:
    """Best-so-far val_acc against trained epochs, median over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(eff)
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        e = eff[name]
        for m, ys in e["best_so_far_median"].items():
            ax.plot(range(1, len(ys) + 1), ys, label=m, lw=2 if m.startswith("tpe+asha") else 1.2,
                    ls="--" if "random" in m else "-")
        ax.axhline(e["target"], color="grey", lw=0.8, ls=":")
        ax.text(1, e["target"], f" within {100 * GOOD_PP:.1f} pp of the pool's best",
                va="bottom", fontsize=8, color="grey")
        ax.set_ylim(max(0.0, e["target"] - 0.15), e["pool_best"] + 0.01)
        ax.set_xlabel("trained epochs (all trials)")
        ax.set_ylabel("best val_acc so far (median of seeds)")
        ax.set_title(f"{name} space: pool of {e['pool_size']}, {e['seeds']} seeds")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# 4. Live check, 5. sampler cost
# --------------------------------------------------------------------------------------------
def live_check(spec: Spec, pool: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    """A real TPE + ASHA search of 8 trials, compared with the replay of the same setting."""
    from raytune_ft.search.run import run_search

    n = 8
    with tempfile.TemporaryDirectory(prefix="rtft-live-") as tmp:
        s = spec.model_copy(update={
            "name": "efficiency-live",
            "run": spec.run.model_copy(update={"num_samples": n, "storage_path": tmp}),
            "promote": spec.promote.model_copy(update={"dir": str(Path(tmp) / "models")})})
        t0 = time.perf_counter()
        outcome = run_search(s, echo=lambda line: None, quiet=True)
        wall = time.perf_counter() - t0
    nearest = Nearest(spec, pool)
    diffs = []
    for rec in outcome.records:
        curve = pool[nearest(rec.params)]["curve"]
        for h in rec.history:
            e = h.get("epoch")
            if e and e <= len(curve) and h.get("val_acc") is not None:
                diffs.append(abs(h["val_acc"] - curve[e - 1]["val_acc"]))
    live_epochs = sum(len(r.history) for r in outcome.records)
    live_best = max((h["val_acc"] for r in outcome.records for h in r.history
                     if h.get("val_acc") is not None), default=float("nan"))
    reps = [replay(spec, pool, "tpe+asha", seed, num_trials=n) for seed in range(seeds)]
    return {"trials": n, "live_wall_s": round(wall, 1), "live_epochs": live_epochs,
            "live_best_val_acc": live_best,
            "replay_epochs_median": median([r["epochs"] for r in reps]),
            "replay_best_median": median([max(v for _, _, v in r["trace"]) for r in reps]),
            "replay_seconds_median": median([r["seconds"] for r in reps]),
            "nearest_curve_abs_diff_median": median(diffs),
            "nearest_curve_abs_diff_max": max(diffs, default=float("nan"))}


def ask_tell_cost(spec: Spec, marks: list[int]) -> dict[str, float]:
    """Mean ms of one trial's searcher work around each trial count in `marks`: ask +
    define-by-run, one intermediate value per epoch it trains, and the fidelity-aware tell
    (PRUNED at ASHA's rungs 1, 2, 4 for 1/2, 1/4, 1/8 of the trials, else COMPLETE), with
    TPE as `make_sampler` configures it and the journal storage `run_search` uses."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from raytune_ft.space import define_by_run, make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = with_method(spec, "tpe", "asha", 0)
    fn = define_by_run(s)
    rng = random.Random(0)
    out: dict[str, float] = {}
    window = 10
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = JournalStorage(JournalFileBackend(str(Path(tmp) / "j.log")))
        study = optuna.create_study(storage=storage, sampler=make_sampler(s),
                                    direction="maximize")
        times: list[float] = []
        for _ in range(max(marks)):
            u = rng.random()
            epochs = 1 if u < 0.5 else 2 if u < 0.75 else 4 if u < 0.875 else s.max_t
            t0 = time.perf_counter()
            t = study.ask()
            fn(t)
            for e in range(1, epochs + 1):
                t.report(rng.random(), e)
            if epochs < s.max_t:
                study.tell(t, state=TrialState.PRUNED)
            else:
                study.tell(t, rng.random())
            times.append(time.perf_counter() - t0)
        for m in marks:
            out[str(m)] = 1000 * sum(times[m - window:m]) / window
    return out


# --------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny pool and task: seconds")
    ap.add_argument("--record-only", action="store_true", help="record the pool and stop")
    ap.add_argument("--pool-size", type=int, default=300,
                    help="configurations of the default space")
    ap.add_argument("--large-pool-size", type=int, default=100,
                    help="configurations of the large space")
    ap.add_argument("--sibling-pool-size", type=int, default=100,
                    help="configurations of the default space on the sibling task")
    ap.add_argument("--task-pool-size", type=int, default=100,
                    help="configurations of the default space on each of " + ", ".join(TASKS))
    ap.add_argument("--max-epochs", type=int, default=8, help="epochs of every pool curve")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="replay only these methods (comma-separated names of METHODS)")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--budget-trials", type=int, default=16,
                    help="epoch budget per replayed search, in full trials")
    ap.add_argument("--workers", type=int, default=2, help="recording processes")
    ap.add_argument("--no-live", action="store_true", help="skip the live check run")
    ap.add_argument("--parts", default="replay,live,asktell",
                    help="what to run (replay, live, asktell); the others' results are kept "
                         "from an earlier efficiency.json")
    ap.add_argument("--recorded-only", action="store_true",
                    help="record nothing: replay the pool's recorded prefix of each space")
    ap.add_argument("--out", help="results folder (default bench/results)")
    args = ap.parse_args()
    out_dir = Path(args.out) if args.out else RESULTS
    if args.smoke:
        args.pool_size, args.large_pool_size, args.sibling_pool_size, args.seeds = 3, 3, 3, 2
        args.task_pool_size = 2
        args.budget_trials, args.no_live = 3, True
        args.workers = 1
    res = Results("efficiency", smoke=args.smoke, out_dir=out_dir)
    specs = spaces(args.smoke, args.max_epochs)
    all_specs = dict(specs)
    parts = set(args.parts.split(","))
    known = {"replay", "live", "asktell", "sweep"}
    if parts - known:
        ap.error(f"--parts: unknown {sorted(parts - known)}")
    if args.no_live:
        parts.discard("live")
    if "replay" not in parts:
        args.recorded_only = True  # nothing to record for the live check or the sampler cost
    pool_file = out_dir / ("efficiency_pool_smoke.jsonl" if args.smoke
                           else f"efficiency_pool_e{args.max_epochs}.jsonl")
    sizes = {"default": args.pool_size, "large": args.large_pool_size,
             "sibling": args.sibling_pool_size, **dict.fromkeys(TASKS, args.task_pool_size)}
    if args.recorded_only:
        sizes = {k: min(n, recorded_prefix(pool_file, specs[k], k)) for k, n in sizes.items()}
        args.pool_size, args.large_pool_size = sizes["default"], sizes["large"]
        args.sibling_pool_size = sizes["sibling"]
        for k in [k for k, n in sizes.items() if n == 0]:
            print(f"no recorded configurations of the {k} space: left out")
            del sizes[k], specs[k]
    pools = record_pool(pool_file, specs, sizes, args.workers)
    if args.record_only:
        return

    found: dict[str, Any] = {}
    if "replay" in parts:
        found["efficiency"] = replay_part(specs, pools, args, out_dir)
    if "live" in parts:
        found["live"] = live_part(specs, pools, args)
    if "asktell" in parts:
        found.update(asktell_part(all_specs, pools, args))
    if "sweep" in parts:
        found["defaults_sweep"] = sweep_part(specs, pools, args)
    found["settings"] = {"pool_size": args.pool_size, "large_pool_size": args.large_pool_size,
                         "sibling_pool_size": args.sibling_pool_size,
                         "max_epochs": args.max_epochs,
                         "seeds": args.seeds, "budget_trials": args.budget_trials,
                         "good_pp": GOOD_PP, "start_s": START_S, "parts": sorted(parts)}
    path = out_dir / "efficiency.json"
    kept = {}
    if path.exists() and not args.smoke:  # parts not run now: keep the earlier results
        old = json.loads(path.read_text())
        kept = {k: old[k] for k in ("efficiency", "live", "ask_tell_ms", "median_trial_s",
                                    "defaults_sweep", "ask_tell_load", "pool_recording_load",
                                    *TRANSFER_KEYS)
                if k in old and k not in found}
    if "live" not in found and "live" not in kept:
        found["live"] = "skipped"
    path = res.write(**kept, **found, pool_file=str(pool_file))
    print(f"\nwrote {path}")


def replay_part(specs: dict[str, Spec], pools: dict[str, list], args: Any,
                out_dir: Path) -> dict[str, Any]:
    """The replayed comparison of the methods, printed and plotted."""
    eff = efficiency_tables(specs, pools, args.seeds, args.budget_trials,
                            workers=args.workers, methods=args.methods.split(","))
    print(f"\ncompute to a good model (val_acc within {100 * GOOD_PP:.1f} pp of the pool's best), "
          f"median [IQR] of {args.seeds} seeds, replayed, 2 trials at a time")
    for name, e in eff.items():
        print(f"\n{name} space: pool {e['pool_size']} configs, best {e['pool_best']:.4f}, "
              f"budget {e['budget_epochs']} epochs")
        print(table(["method", "epochs [IQR]", "vs random full", "vs random+asha",
                     "sim. s [IQR]", "reached", f"≤{100 * LOOSE_PP:g} pp: epochs", "reached",
                     "regret at end", "told C/P/F"],
                    [[m, f"{r['median_epochs']:g} [{r['epochs_q25_median_q75'][0]:g}–"
                         f"{r['epochs_q25_median_q75'][2]:g}]", r["vs_random_full"],
                      r["vs_random_asha"], f"{r['median_seconds']:.0f} "
                      f"[{r['seconds_q25_median_q75'][0]:.0f}–"
                      f"{r['seconds_q25_median_q75'][2]:.0f}]",
                      f"{r['reached']}/{r['seeds']}",
                      f"{r['epochs_to_loose_q25_median_q75'][1]:g}",
                      f"{r['reached_loose']}/{r['seeds']}", r["regret_median"],
                      "/".join(f"{r['told'][k]:g}" for k in ("COMPLETE", "PRUNED", "FAIL"))]
                     for m, r in e["methods"].items()]))
    plot = out_dir / ("efficiency_smoke.png" if args.smoke else "efficiency.png")
    plot_curves(eff, plot)
    print(f"plot: {plot}")
    return eff


def sweep_part(specs: dict[str, Spec], pools: dict[str, list], args: Any) -> list[dict]:
    """The defaults sweep, printed best first."""
    rows = defaults_sweep(specs["default"], pools["default"], args.seeds, args.budget_trials,
                          args.workers)
    print(f"\ndefaults sweep: fidelity-aware TPE+ASHA, default space, {args.seeds} seeds")
    print(table(["n_startup", "grace", "η", "epochs to good", "trials started", "reached",
                 f"≤{100 * LOOSE_PP:g} pp: epochs", "reached", "regret"],
                [[r["n_startup_trials"], r["grace_period"], r["reduction_factor"],
                  r["median_epochs"], r["median_trials_started"], f"{r['reached']}/{args.seeds}",
                  r["median_epochs_loose"], f"{r['reached_loose']}/{args.seeds}",
                  r["regret_median"]] for r in rows]))
    return rows


def live_part(specs: dict[str, Spec], pools: dict[str, list], args: Any) -> dict[str, Any]:
    """The live run_search against the replay, printed."""
    live = live_check(specs["default"], pools["default"], args.seeds)
    print("\nlive check (real run_search, TPE + ASHA, 8 trials) vs replay of the same:")
    print(table(["", "epochs", "best val_acc"],
                [["live", live["live_epochs"], live["live_best_val_acc"]],
                 ["replay (median)", live["replay_epochs_median"],
                  live["replay_best_median"]]]))
    print(f"live trials' val_acc vs their nearest pool curve: median |diff| "
          f"{live['nearest_curve_abs_diff_median']:.4f}, max "
          f"{live['nearest_curve_abs_diff_max']:.4f}")
    return live


def asktell_part(specs: dict[str, Spec], pools: dict[str, list], args: Any) -> dict[str, Any]:
    """Optuna's ask + tell per trial with our spaces, and its share of a trial, printed."""
    marks = [10, 20] if args.smoke else [100, 1000, 5000]
    load_before = load_average()
    cost = {name: ask_tell_cost(spec, marks) for name, spec in specs.items()
            if name != "sibling"}  # the same space as default
    trial_s = median([e["seconds"] for e in pools["default"] if e["curve"]])
    print(f"\nOptuna TPE ask + tell per trial (ms; anchor ≈ 17 ms at 1,000 trials × 8 params), "
          f"share of a median full trial ({trial_s:.1f} s)")
    rows = []
    for name, c in cost.items():
        n_params = sum(p.space != "fixed" for p in specs[name].search.values())
        for m, ms in c.items():
            rows.append([f"{name} ({n_params} params)", m, ms, 100 * ms / 1000 / trial_s])
    print(table(["space", "trials", "ms/trial", "% of trial"], rows))
    return {"ask_tell_ms": cost, "median_trial_s": trial_s,
            "ask_tell_load": {"before": load_before, "after": load_average()}}


if __name__ == "__main__":
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    main()
