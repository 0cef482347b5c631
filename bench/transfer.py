"""The default search against what users would run instead, on tasks it has never seen:
leave-one-task-out replays over the recorded pools of several fine-tuning tasks.

    python bench/transfer.py                   # choose K and brackets, then the comparison
    python bench/transfer.py --smoke           # seconds: the smoke pools, 2 seeds
    python bench/transfer.py --write-builtin   # also rebuild raytune_ft/portfolio_builtin.json

How it works:

1. The pools are `bench/efficiency.py`'s (`results/efficiency_pool_e8.jsonl`): the default
   space of `search_spaces/resnet.yaml`, drawn with one seed, so configuration *i* is the same
   in every pool, each trained 8 epochs on each task (default digits task, sibling digits,
   mobilenet_v3_small, 100 training images, no pretraining). Only recorded curves are read.
2. A **portfolio** of K configurations is picked greedily from the pools of the training
   tasks to minimise the mean regret across them: on task t a configuration's regret is the
   pool's best val_acc minus its own best, either *normalised* (divided by the pool's best
   minus its median, so an easy task and a hard one weigh the same) or in pp; a portfolio's
   regret is that of its best member. Only the configurations every training pool holds are
   candidates. Which objective is chosen with K, by the replays below.
3. **Leave one task out**: for each task, the portfolio is rebuilt without that task's pool
   and replayed on it (`efficiency.replay`: the real searcher, scheduler and
   `raytune_ft.portfolio.plan`), 20 seeds, a budget of 16 full trials (128 epochs), 2 trials
   at a time, no baseline-first trial (it would measure the baseline, not the searcher).
4. K, the objective, the number of ASHA brackets and TPE's n_startup_trials are chosen by
   the same leave-one-task-out replays (`--ks`, `--objectives`, `--brackets`, `--startups`;
   fewer seeds, 0..7, a subset of the reported 20: the choice is made on the data it is
   reported on, among 48 settings), first by the targets (no task above random-full at the
   full budget), then by the mean regret at 25 %, 50 % and 100 % of the budget; then the
   methods are compared: random at full budget; random+ASHA; TPE+ASHA as a
   plain Ray Tune user runs it (Ray's telling `last`, one bracket, Ray's ASHA defaults grace 1
   and reduction factor 4); the previous default (fidelity-aware TPE+ASHA, grace 2, η 2, one
   bracket); the new default (the same with the portfolio and the chosen brackets); and the
   new default without the portfolio, and without hedging (one bracket).
5. Measures: regret (fraction: 0.01 = 1 pp) after 25 %, 50 % and 100 % of the budget, epochs
   until a trial reports within 1 pp and 0.5 pp of the pool's best; medians over seeds, per
   task and averaged over tasks. Importances of the knobs per task (fANOVA over each pool).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import efficiency as eff  # noqa: E402
from _common import RESULTS, Results, load_average, median, table  # noqa: E402

from raytune_ft.spec.schema import Spec  # noqa: E402

TASKS = ("default", "sibling", *eff.TASKS)  # the pools of the default space
BUDGET_TRIALS = 16
# name → (sampler, scheduler, telling, warm), knobs, portfolio?; "K"/"B" are filled in.
RAY_ASHA = {"grace_period": 1, "reduction_factor": 4, "brackets": 1}  # ASHAScheduler()'s
PREVIOUS = {"grace_period": 2, "reduction_factor": 2, "brackets": 1, "n_startup_trials": 6}


def methods(chosen: dict[str, Any]) -> dict[str, tuple[tuple, dict[str, Any],
                                                      tuple[int, str] | None]]:
    """The compared methods: (method tuple, knobs, portfolio: (size, objective) or None).
    `chosen`: the new default's K, objective, brackets and n_startup_trials."""
    k = (chosen["K"], chosen["objective"])
    new = {**PREVIOUS, "brackets": chosen["brackets"],
           "n_startup_trials": chosen["n_startup_trials"]}
    return {
        "random full": (("random", "none", "last", False), {}, None),
        "random+asha": (("random", "asha", "last", False), RAY_ASHA, None),
        "tpe+asha (ray: last)": (("tpe", "asha", "last", False), RAY_ASHA, None),
        "previous default": (("tpe", "asha", "fidelity", False), PREVIOUS, None),
        "rtft default": (("tpe", "asha", "fidelity", False), new, k),
        "rtft default, no portfolio": (("tpe", "asha", "fidelity", False), new, None),
        "rtft default, no hedging": (("tpe", "asha", "fidelity", False),
                                     {**new, "brackets": 1}, k),
    }


# --------------------------------------------------------------------------------------------
# Portfolios
# --------------------------------------------------------------------------------------------
def finals(pool: list[dict[str, Any]]) -> list[float]:
    """Each configuration's best val_acc over its recorded curve (0 for one that failed)."""
    return [max((c["val_acc"] for c in e["curve"]), default=0.0) for e in pool]


OBJECTIVES = ("normalised", "pp")


def regrets(pools: dict[str, list[dict]], n: int, objective: str) -> dict[str, list[float]]:
    """{task: [regret of configuration i for i < n]}: the pool's best val_acc minus the
    configuration's, in pp (`pp`), or divided by the pool's best minus its median
    (`normalised`: every task weighs the same whatever its spread)."""
    out = {}
    for task, pool in pools.items():
        f = finals(pool)
        best, mid = max(f), median(f)
        scale = max(best - mid, 1e-9) if objective == "normalised" else 0.01
        out[task] = [(best - x) / scale for x in f[:n]]
    return out


def greedy_portfolio(pools: dict[str, list[dict]], k: int,
                     objective: str = "normalised") -> list[int]:
    """Indices of `k` configurations chosen greedily (each step the one that lowers the mean
    over tasks of the portfolio's regret most, `objective` as :func:`regrets`; ties: the
    lower index)."""
    n = min(len(p) for p in pools.values())
    nr = regrets(pools, n, objective)
    chosen: list[int] = []
    current = {t: math.inf for t in nr}
    def score(i: int, current: dict[str, float]) -> float:
        return sum(min(current[t], nr[t][i]) for t in nr) / len(nr)

    for _ in range(min(k, n)):
        best = min((i for i in range(n) if i not in chosen),
                   key=lambda i: (score(i, current), i))
        chosen.append(best)
        current = {t: min(current[t], nr[t][best]) for t in nr}
    return chosen


def searched_params(spec: Spec, params: dict[str, Any]) -> dict[str, Any]:
    """A pool configuration without the knobs the space fixes (batch_size, augment, ...)."""
    keep = {n for n, p in spec.search.items() if p.space != "fixed"}
    return {k: v for k, v in params.items() if k in keep}


def portfolio_for(specs: dict[str, Spec], pools: dict[str, list[dict]], k: int,
                  leave_out: str | None, objective: str = "normalised"
                  ) -> tuple[list[int], list[dict[str, Any]]]:
    """The portfolio built from every pool but `leave_out`'s: indices and configurations."""
    train = {t: p for t, p in pools.items() if t != leave_out}
    idx = greedy_portfolio(train, k, objective)
    some = next(iter(train))
    return idx, [searched_params(specs[some], train[some][i]["params"]) for i in idx]


# --------------------------------------------------------------------------------------------
# Replays
# --------------------------------------------------------------------------------------------
def _job(job: tuple) -> dict[str, Any]:
    spec_json, pool, method, knobs, portfolio, seed, budget = job
    warnings.filterwarnings("ignore")
    r = eff.replay(Spec.model_validate(spec_json), pool, method, seed, budget_epochs=budget,
                   baseline=False, knobs=knobs, portfolio=portfolio)
    return {"trace": r["trace"], "trials": r["trials"]}


def measures(rs: list[dict[str, Any]], pool_best: float, budget: int) -> dict[str, Any]:
    """Medians over seeds of the regrets at 25/50/100 % and the epochs to 1 and 0.5 pp."""
    def regret_at(r: dict, share: float) -> float:
        seen = [v for e, _, v in r["trace"] if e <= share * budget]
        return pool_best - max(seen) if seen else pool_best

    out: dict[str, Any] = {}
    for share, key in ((0.25, "regret_25"), (0.5, "regret_50"), (1.0, "regret_full")):
        vals = [regret_at(r, share) for r in rs]
        out[f"{key}_median"] = round(median(vals), 5)
        out[f"{key}_q75"] = round(eff.quartiles(vals)[2], 5)
    for pp, key in ((0.01, "epochs_to_1pp"), (0.005, "epochs_to_05pp")):
        hits = [eff.to_target(r["trace"], pool_best - pp)[0] for r in rs]
        m = eff.quartiles(hits)[1]
        out[f"{key}_median"] = m if math.isfinite(m) else None  # null: not within budget
        out[f"{key}_reached"] = sum(math.isfinite(h) for h in hits)
    out["trials_median"] = median([r["trials"] for r in rs])
    out["seeds"] = len(rs)
    return out


def run_replays(specs: dict[str, Spec], pools: dict[str, list[dict]],
                plan: dict[str, tuple[tuple, dict[str, Any], tuple[int, str] | None]],
                seeds: int,
                workers: int) -> dict[str, dict[str, Any]]:
    """{task: {method: measures}} for every method of `plan`, leave-one-task-out."""
    jobs, keys = [], []
    portfolios: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for task in pools:
        spec, pool = specs[task], pools[task]
        budget = BUDGET_TRIALS * spec.max_t
        for name, (method, knobs, built) in plan.items():
            pf = None
            if built:
                if (task, *built) not in portfolios:
                    portfolios[(task, *built)] = portfolio_for(specs, pools, built[0], task,
                                                               built[1])[1]
                pf = portfolios[(task, *built)]
            for seed in range(seeds):
                jobs.append((spec.model_dump(mode="json"), pool, method, knobs, pf, seed,
                             budget))
                keys.append((task, name))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            done = list(ex.map(_job, jobs, chunksize=4))
    else:
        done = [_job(j) for j in jobs]
    out: dict[str, dict[str, Any]] = {}
    for task in pools:
        best = max(finals(pools[task]))
        budget = BUDGET_TRIALS * specs[task].max_t
        out[task] = {name: measures([r for kk, r in zip(keys, done, strict=True)
                                     if kk == (task, name)], best, budget)
                     for name in plan}
    return out


def average(per_task: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean over tasks of each method's medians (epochs: over the tasks that reached it)."""
    names = next(iter(per_task.values())).keys()
    out = {}
    for m in names:
        rows = [per_task[t][m] for t in per_task]
        avg: dict[str, Any] = {}
        for key in rows[0]:
            vals = [r[key] for r in rows if isinstance(r[key], (int, float))]
            avg[key] = round(sum(vals) / len(vals), 5) if vals else None
        avg["tasks"] = len(rows)
        avg["epochs_to_1pp_tasks_reached"] = sum(r["epochs_to_1pp_median"] is not None
                                                 for r in rows)
        avg["epochs_to_05pp_tasks_reached"] = sum(r["epochs_to_05pp_median"] is not None
                                                  for r in rows)
        out[m] = avg
    return out


def choose(specs: dict[str, Spec], pools: dict[str, list[dict]], grid: list[dict[str, Any]],
           seeds: int, workers: int) -> tuple[dict[str, Any], list[dict]]:
    """K, the portfolio's objective, brackets and n_startup_trials of the new default, by
    the leave-one-task-out replays. First the targets: fewest tasks whose median regret at
    the full budget is above random-full's; then the lowest sum of the mean regrets at 25,
    50 and 100 %; on a tie the smaller portfolio, then the hedge (more brackets: it costs
    nothing measured, and guards fine-tunes that start slowly on tasks not in the pools)."""
    plan = {json.dumps(g): (("tpe", "asha", "fidelity", False),
                            {**PREVIOUS, "brackets": g["brackets"],
                             "n_startup_trials": g["n_startup_trials"]},
                            (g["K"], g["objective"]))
            for g in grid}
    plan["random full"] = methods(grid[0])["random full"]
    per_task = run_replays(specs, pools, plan, seeds, workers)
    avg = average(per_task)
    rows = []
    for name, a in avg.items():
        if name == "random full":
            continue
        worse = [t for t in per_task if per_task[t][name]["regret_full_median"]
                 > per_task[t]["random full"]["regret_full_median"] + 1e-9]
        rows.append({**json.loads(name), **{key: a[key] for key in (
            "regret_25_median", "regret_50_median", "regret_full_median",
            "epochs_to_1pp_median", "epochs_to_05pp_median")},
            "tasks_worse_than_random_full": worse,
            "score": a["regret_25_median"] + a["regret_50_median"] + a["regret_full_median"]})
    rows.sort(key=lambda r: (len(r["tasks_worse_than_random_full"]), round(r["score"], 6),
                             r["K"], -r["brackets"], r["n_startup_trials"], r["objective"]))
    best = {k: rows[0][k] for k in ("K", "objective", "brackets", "n_startup_trials")}
    return best, rows


# --------------------------------------------------------------------------------------------
# Which knobs mattered where
# --------------------------------------------------------------------------------------------
def importances(spec: Spec, pool: list[dict[str, Any]]) -> dict[str, float]:
    """fANOVA importances of the searched knobs for the final val_acc of a pool (Optuna's
    evaluator, over the pool's configurations re-asked with their own distributions)."""
    import optuna

    from raytune_ft.space import baseline_params, sample_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=1234))
    study.enqueue_trial(baseline_params(spec))  # as pool_params drew them: baseline first
    for e, v in zip(pool, finals(pool), strict=True):
        t = study.ask()
        got = sample_params(spec, t)
        if searched_params(spec, got) != searched_params(spec, e["params"]):
            # the baseline (enqueued with its own values) or a changed space: tell by value
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            continue
        study.tell(t, v)
    ev = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        got = optuna.importance.get_param_importances(study, evaluator=ev)
    except RuntimeError:  # a pool without spread (the smoke pools): nothing to attribute
        return {}
    return {k: round(v, 3) for k, v in got.items()}


def level_table(spec: Spec, pools: dict[str, list[dict]], knob: str) -> dict[str, dict]:
    """Median final val_acc of the configurations with each value of a categorical knob,
    per task: the direct answer to "which init / activation / optimiser"."""
    out: dict[str, dict] = {}
    for task, pool in pools.items():
        by: dict[str, list[float]] = {}
        for e, v in zip(pool, finals(pool), strict=True):
            if knob in e["params"]:
                by.setdefault(str(e["params"][knob]), []).append(v)
        out[task] = {lvl: round(median(vs), 4) for lvl, vs in sorted(by.items())}
    return out


# --------------------------------------------------------------------------------------------
def plot(data: dict[str, Any], path: Path) -> Path:
    """Regret after 25, 50 and 100 % of the budget, per method: one panel per held-out task
    and one for the average (the figure bench/README.md shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*data["tasks"].items(), ("average over tasks", {"methods": data["average"]})]
    names = list(data["average"])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.8), sharey=True)
    shares = (("regret_25_median", "25 %"), ("regret_50_median", "50 %"),
              ("regret_full_median", "100 %"))
    width = 0.8 / len(names)
    for ax, (title, t) in zip(axes, panels, strict=True):
        for j, m in enumerate(names):
            ys = [100 * (t["methods"][m][key] or 0) for key, _ in shares]
            ax.bar([i + j * width for i in range(len(shares))], ys, width, label=m,
                   color=plt.cm.tab10(j), edgecolor="black" if m == "rtft default" else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shares))],
                      [lbl for _, lbl in shares])
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("regret (pp), median of seeds")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Leave-one-task-out replays, budget 16 full trials (bench/transfer.py)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_pools(smoke: bool, out_dir: Path) -> tuple[dict[str, Spec], dict[str, list[dict]],
                                                   Path]:
    """The specs and the recorded pools of TASKS (only what is recorded; in smoke mode the
    tiny pools are recorded first, in seconds)."""
    specs = eff.spaces(smoke)
    pool_file = (out_dir / "efficiency_pool_smoke.jsonl" if smoke
                 else RESULTS / "efficiency_pool_e8.jsonl")
    sizes = ({t: 3 for t in TASKS} if smoke
             else {t: eff.recorded_prefix(pool_file, specs[t], t) for t in TASKS})
    missing = [t for t, n in sizes.items() if n == 0]
    if missing:
        raise SystemExit(f"no recorded curves for {missing} in {pool_file}: run "
                         f"`python bench/efficiency.py --record-only` first")
    pools = eff.record_pool(pool_file, {t: specs[t] for t in TASKS}, sizes, 1)
    return specs, pools, pool_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--choose-seeds", type=int, default=10, help="seeds for choosing K, B")
    ap.add_argument("--ks", default="2,3,4,6,8", help="portfolio sizes to try")
    ap.add_argument("--brackets", default="1,2,3", help="ASHA bracket counts to try")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES),
                    help="what the greedy portfolio minimises: the mean normalised regret "
                         "across tasks, or the mean regret in pp")
    ap.add_argument("--startups", default="6,10",
                    help="TPE n_startup_trials to try (the portfolio's trials count in them)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--write-builtin", action="store_true",
                    help="rebuild raytune_ft/portfolio_builtin.json from all the pools")
    ap.add_argument("--out", help="results folder (default bench/results)")
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw the plot from the results' efficiency.json")
    args = ap.parse_args()
    out_dir = Path(args.out) if args.out else RESULTS
    if args.plot_only:
        data = json.loads((out_dir / "efficiency.json").read_text())
        print(f"plot: {plot(data, out_dir / _plot_name(args.smoke))}")
        return
    if args.smoke:
        args.seeds, args.choose_seeds, args.ks, args.brackets = 2, 1, "1,2", "1,2"
        args.startups, args.objectives = "2", "normalised"
        args.workers = 1
    res = Results("efficiency", smoke=args.smoke, out_dir=out_dir)
    t0 = time.perf_counter()
    specs, pools, pool_file = load_pools(args.smoke, out_dir)
    print("pools: " + ", ".join(f"{t} {len(p)} (best {max(finals(p)):.4f})"
                                for t, p in pools.items()), flush=True)
    grid = [{"K": k, "objective": o, "brackets": int(b), "n_startup_trials": int(n)}
            for k in (int(x) for x in args.ks.split(",")) for o in args.objectives.split(",")
            for b in args.brackets.split(",") for n in args.startups.split(",")]
    chosen, sweep = choose(specs, pools, grid, args.choose_seeds, args.workers)
    k = chosen["K"]
    print(f"\nchoosing K, brackets and n_startup_trials ({args.choose_seeds} seeds, "
          f"leave-one-task-out; regrets in pp):")
    print(table(["K", "objective", "brackets", "n_startup", "25 %", "50 %", "100 %",
                 "ep to 1pp", "ep to 0.5pp", "tasks worse than random full at 100 %"],
                [[r["K"], r["objective"], r["brackets"], r["n_startup_trials"],
                  100 * r["regret_25_median"],
                  100 * r["regret_50_median"], 100 * r["regret_full_median"],
                  r["epochs_to_1pp_median"], r["epochs_to_05pp_median"],
                  ", ".join(r["tasks_worse_than_random_full"]) or "none"] for r in sweep]))
    print(f"chosen: {chosen}", flush=True)

    per_task = run_replays(specs, pools, methods(chosen), args.seeds, args.workers)
    avg = average(per_task)
    for task, rows in [*per_task.items(), ("average over tasks", avg)]:
        print(f"\n{task}: regret (pp) after 25/50/100 % of {BUDGET_TRIALS} full trials, "
              f"epochs to 1 / 0.5 pp (median of {args.seeds} seeds)")
        print(table(["method", "25 %", "50 %", "100 %", "ep 1pp", "ep 0.5pp"],
                    [[m, 100 * r["regret_25_median"], 100 * r["regret_50_median"],
                      100 * r["regret_full_median"], r["epochs_to_1pp_median"],
                      r["epochs_to_05pp_median"]] for m, r in rows.items()]))

    obj = chosen["objective"]
    loto = {t: portfolio_for(specs, pools, k, t, obj)[0] for t in pools}
    full_idx, full_cfgs = portfolio_for(specs, pools, k, None, obj)
    imp = {t: importances(specs[t], pools[t]) for t in pools}
    levels = {knob: level_table(specs["default"], pools, knob)
              for knob in ("init", "activation", "optimizer", "freeze_depth", "head_hidden")}
    print("\nimportances (fANOVA, final val_acc):")
    knobs = sorted({n for d in imp.values() for n in d})
    print(table(["task", *knobs], [[t, *[d.get(n) for n in knobs]] for t, d in imp.items()]))
    if args.write_builtin and not args.smoke:
        from raytune_ft import portfolio

        about = (f"Built by bench/transfer.py on {time.strftime('%Y-%m-%d')}: the {k} "
                 f"configurations of search_spaces/resnet.yaml's space that minimise the mean "
                 f"{'normalised regret' if obj == 'normalised' else 'regret (pp)'} over the "
                 f"recorded 8-epoch pools of "
                 f"{', '.join(pools)} (pool indices {full_idx}, {pool_file.name}); K chosen "
                 f"by leave-one-task-out replays (bench/README.md).")
        path = portfolio.write(portfolio.BUILTIN_FILE, full_cfgs, about)
        print(f"wrote {path}")

    tasks = {t: {"pool_size": len(pools[t]), "pool_best": max(finals(pools[t])),
                 "portfolio_indices_loto": loto[t], "methods": per_task[t],
                 "importances": imp[t]} for t in pools}
    # efficiency.json is shared with efficiency.py (one task's replays, the sweep, the
    # searcher's cost): what this script does not write is kept.
    old = {}
    if (out_dir / "efficiency.json").exists() and not args.smoke:
        old = {k: v for k, v in json.loads((out_dir / "efficiency.json").read_text()).items()
               if k not in res.data and k not in {"load_end", "seconds"}}
    transfer_keys = set(eff.TRANSFER_KEYS)
    path = res.write(
        **{k: v for k, v in old.items() if k not in transfer_keys},
        transfer_load={"start": res.data["load_start"], "end": load_average()},
        tasks=tasks, average=avg, chosen=chosen, choice_sweep=sweep,
        builtin_portfolio={"indices": full_idx, "configs": full_cfgs},
        levels=levels, transfer_settings={"seeds": args.seeds, "choose_seeds": args.choose_seeds,
                                 "budget_trials": BUDGET_TRIALS, "concurrency": 2,
                                 "baseline_first": False, "ray_asha": RAY_ASHA,
                                 "previous": PREVIOUS, "pool_file": str(pool_file.name)},
        transfer_wall_s=round(time.perf_counter() - t0, 1))
    print(f"\nwrote {path}")
    print(f"plot: {plot(json.loads(path.read_text()), out_dir / _plot_name(args.smoke))}")


def _plot_name(smoke: bool) -> str:
    return "transfer_smoke.png" if smoke else "transfer.png"


if __name__ == "__main__":
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    main()
