"""Orchestration overhead: the same trials bare, in a plain Ray Tune script, and through rtft.

    python bench/overhead.py             # 8 trials x 2 epochs of the default task, 2 at a time, x3
    python bench/overhead.py --smoke     # seconds: 2 tiny trials, once
    python bench/overhead.py --trials 8 --epochs 8 --image-size 16 --train-limit 200  # short

The same fixed trial configuration (the default fine-tune of ``search_spaces/resnet.yaml``: its
fixed knobs plus the baseline values of its searched ones, every parameter ``fixed``; all trials
identical, so the three ways do exactly the same training), ``train.max_epochs`` 2, no early
stopping, 2 trials at a time with 1 thread each, run three ways, each in a fresh Python process
(so each pays its own imports and start-up, as a user's command does):

(a) bare     our ``train()`` in 2 worker processes (``ProcessPoolExecutor``, spawn), no Ray;
(b) plain    a hand-written Ray Tune script: a function trainable that calls our ``train()``
             and ``tune.report``s each epoch's metrics, data passed with ``tune.with_parameters``,
             Tune's defaults otherwise. It calls our ``train()`` (not a separate loop) so that
             (c)/(b) measures only what ``raytune_ft/search/`` adds on top of Ray Tune — the trainer
             itself is compared with a hand-written loop in ``bench/trainer.py``;
(c) rtft     ``run_search`` on that spec (scheduler none; Optuna samples nothing), with
             everything it does: preflight, Ray with the dashboard, Optuna journal, its
             checkpoints (after a trial's last epoch, plus `run.checkpoint_every` epochs or
             minutes), TensorBoard, progress lines, promotion of the best trial.

(a) and (b) train without checkpoints; (c) keeps rtft's checkpoints (they are what makes resume
and promotion work), so their cost counts as overhead. The trainer traces how long each epoch's
report took (`report ms/epoch`: Tune's report, and for (c) the checkpoint write and Ray's copy
of it into the trial's folder). `--image-size 16 --train-limit 200` makes epochs short (about
half a second here), as they are on a GPU, where a fixed cost per epoch weighs most. The three
ways run in turn, rotated each repeat; every ratio is the median of the per-repeat ratios.
Trial start-up is measured from the trainer's own timestamps (``RTFT_TRACE``, see
``raytune_ft/train.py``): the gap between a trial ending and the next trial in that slot being
ready to take its first step (model built, data on hand), and for the first trials from the
process start.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from _common import (  # noqa: E402
    DEFAULT_SPEC,
    RESULTS,
    SMOKE_OVERRIDES,
    Results,
    median,
    table,
)

from raytune_ft.spec.schema import Spec  # noqa: E402
from raytune_ft.spec.yaml_io import load_spec  # noqa: E402

WAYS = {"a": "(a) bare train()", "b": "(b) plain Ray Tune", "c": "(c) rtft run_search"}
TARGETS = {"c/a": 1.10, "c/b": 1.03}


def fixed_spec(trials: int, epochs: int, smoke: bool, root: Path,
               short: list[str] | None = None) -> Spec:
    """The default task with every search parameter fixed to its baseline value (`short`:
    overrides that make epochs short, as on a GPU)."""
    from raytune_ft.space import baseline_params

    overrides = (SMOKE_OVERRIDES if smoke else []) + (short or []) + [
        f"train.max_epochs={epochs}", "scheduler.type=none", "scheduler.brackets=1",
        f"run.num_samples={trials}", "run.max_concurrent_trials=2", "run.resources.cpu=1",
        f"run.storage_path={root}/runs", f"promote.dir={root}/models", "name=overhead"]
    spec = load_spec(DEFAULT_SPEC, overrides)
    values = {n: p.value for n, p in spec.search.items() if p.space == "fixed"}
    values.update(baseline_params(spec))
    data = spec.model_dump(mode="json")
    data["search"] = {n: {"space": "fixed", "value": v} for n, v in values.items()}
    return Spec.model_validate(data)


# --------------------------------------------------------------------------------------------
# The three ways (each runs in its own child process)
# --------------------------------------------------------------------------------------------
def _bare_trial(spec_json: dict, data: Any) -> None:
    from raytune_ft.space import hparams_for
    from raytune_ft.train import train

    spec = Spec.model_validate(spec_json)
    params = {n: p.value for n, p in spec.search.items()}
    train(hparams_for(spec, params), spec=spec, data=data, report=lambda m, c: None,
          num_threads=1, checkpoints=False)


def way_a(spec: Spec, info: dict[str, Any]) -> None:
    """Bare: our train() in 2 worker processes, no Ray."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from raytune_ft.data import prepare
    from raytune_ft.model.pretrain import ensure_backbone

    ensure_backbone(spec, echo=lambda s: None)
    data = prepare(spec.data).without_test()
    spec_json = spec.model_dump(mode="json")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as ex:
        list(ex.map(_bare_trial, [spec_json] * spec.run.num_samples,
                    [data] * spec.run.num_samples))


def _plain_trainable(config: dict[str, Any], spec_json: dict, data: Any) -> None:
    from ray import tune

    from raytune_ft.space import hparams_for
    from raytune_ft.train import train

    spec = Spec.model_validate(spec_json)
    params = {n: p.value for n, p in spec.search.items()}
    train(hparams_for(spec, params), spec=spec, data=data,
          report=lambda m, c: tune.report(m), num_threads=1, checkpoints=False)


def way_b(spec: Spec, info: dict[str, Any]) -> None:
    """A plain hand-written Ray Tune script around train()."""
    import logging

    import ray
    from ray import tune

    from raytune_ft.data import prepare
    from raytune_ft.model.pretrain import ensure_backbone

    ensure_backbone(spec, echo=lambda s: None)
    data = prepare(spec.data).without_test()
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    info["ray_init_s"] = time.perf_counter() - t0
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_plain_trainable, spec_json=spec.model_dump(mode="json"),
                                 data=data), {"cpu": 1})
        tune.Tuner(trainable,
                   tune_config=tune.TuneConfig(num_samples=spec.run.num_samples,
                                               max_concurrent_trials=2),
                   run_config=tune.RunConfig(storage_path=spec.run.storage_path, name="plain",
                                             verbose=0)).fit()
    finally:
        ray.shutdown()


def way_c(spec: Spec, info: dict[str, Any]) -> None:
    """rtft's run_search on the fixed spec."""
    from raytune_ft.search import run as search_run

    ensure = search_run.ensure_ray

    def timed_ensure(*a: Any, **k: Any) -> bool:  # Ray's start-up, reported apart
        t0 = time.perf_counter()
        try:
            return ensure(*a, **k)
        finally:
            info["ray_init_s"] = time.perf_counter() - t0

    search_run.ensure_ray = timed_ensure
    starts: list[float] = []

    def echo(line: str) -> None:
        if " start  " in line:
            starts.append(time.time())

    search_run.run_search(spec, echo=echo, quiet=False)
    info["trial_start_events"] = starts


def child(way: str, spec_json: dict, out: Path) -> None:
    """Run one way in this process and write its timings to `out`."""
    t0 = time.perf_counter()
    spec = Spec.model_validate(spec_json)
    info: dict[str, Any] = {"way": way, "import_s": time.perf_counter() - t0}
    {"a": way_a, "b": way_b, "c": way_c}[way](spec, info)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    info["driver_cpu_s"] = ru.ru_utime + ru.ru_stime
    out.write_text(json.dumps(info))


# --------------------------------------------------------------------------------------------
# The parent: run the ways side by side, read the traces
# --------------------------------------------------------------------------------------------
def startup(trace: Path, t_launch: float, concurrency: int) -> dict[str, Any]:
    """Trial start-up from the trainer's timestamps.

    first: process launch → each of the first `concurrency` trials ready for its first step;
    later: previous trial in the slot ended → next trial ready (FIFO: the k-th trial to end
    frees the slot the (k + concurrency)-th trial takes); setup: train() entry → ready.
    """
    ev = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    ready = sorted(e["t"] for e in ev if e["event"] == "ready")
    start = sorted(e["t"] for e in ev if e["event"] == "start")
    end = sorted(e["t"] for e in ev if e["event"] == "end")
    reports = [e for e in ev if e["event"] == "report"]
    return {"report_s": sum(e["s"] for e in reports), "epochs_seen": len(reports),
            "checkpoints": sum(e.get("ckpt", 0) for e in reports),
            "first": [r - t_launch for r in ready[:concurrency]],
            "later": [r - e for r, e in zip(ready[concurrency:], end, strict=False)],
            "setup": [r - s for r, s in zip(ready, start, strict=False)],
            "trials_seen": len(ready)}


def run_way(way: str, spec: Spec, root: Path) -> dict[str, Any]:
    """One way in a fresh process; wall time from launch to exit, plus what it recorded."""
    trace, out = root / f"trace-{way}.jsonl", root / f"info-{way}.json"
    for p in (trace, out):
        p.unlink(missing_ok=True)
    # Every repeat is a fresh run: rtft refuses to reuse an existing run without --resume.
    for name in (spec.name, "plain"):
        shutil.rmtree(Path(spec.run.storage_path) / name, ignore_errors=True)
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(spec.model_dump(mode="json")))
    env = {**os.environ, "RTFT_TRACE": str(trace), "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)  # each way starts its own local Ray, as a user's command does
    t_launch = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", way, "--spec-json",
                           str(spec_file), "--info", str(out)], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"way {way} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    info = json.loads(out.read_text())
    info.update(wall_s=wall, **startup(trace, t_launch, 2))
    if way == "c":
        ready = sorted(json.loads(x)["t"] for x in trace.read_text().splitlines()
                       if '"ready"' in x)
        # Ray's on_trial_start (actor up) → the trainer ready: what Tune itself adds per trial.
        starts = sorted(info.pop("trial_start_events"))
        info["ray_start_to_ready"] = [r - s for r, s in zip(ready, starts, strict=False)]
    return info


def profile_driver(trials: int, epochs: int, smoke: bool) -> None:
    """(c) in this process under cProfile, timed by CPU time: the driver's hot spots."""
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory(prefix="rtft-overhead-") as tmp:
        spec = fixed_spec(trials, epochs, smoke, Path(tmp))
        prof = cProfile.Profile(time.process_time)
        info: dict[str, Any] = {}
        prof.enable()
        way_c(spec, info)
        prof.disable()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"driver CPU {ru.ru_utime + ru.ru_stime:.1f} s")
    stats = pstats.Stats(prof).sort_stats("cumulative")
    stats.print_stats(40)
    stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="2 tiny trials, once: seconds")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=None,
                    help="short epochs, as on a GPU: e.g. --image-size 16 --train-limit 200 "
                         "(with no pretrained weights: nothing to pretrain at that size)")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--ways", default="abc")
    ap.add_argument("--out", help="results folder (default bench/results)")
    ap.add_argument("--profile", action="store_true",
                    help="run (c) once in this process under cProfile (CPU time) and print "
                         "where the driver's time goes")
    ap.add_argument("--summarize", metavar="JSON",
                    help="print the tables of an earlier run's overhead.json (even partial)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec-json", help=argparse.SUPPRESS)
    ap.add_argument("--info", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, json.loads(Path(args.spec_json).read_text()), Path(args.info))
        return
    if args.smoke:
        args.trials, args.epochs, args.repeats = 2, 1, 1
    short = ([f"data.image_size={args.image_size}"] if args.image_size else []) + \
        ([f"data.train_limit={args.train_limit}"] if args.train_limit else [])
    if short:
        short.append("model.weights=none")
    if args.profile:
        profile_driver(args.trials, args.epochs, args.smoke)
        return
    res = Results("overhead_short" if short else "overhead", smoke=args.smoke,
                  out_dir=Path(args.out) if args.out else RESULTS)
    if args.summarize:  # the tables of an earlier (possibly cut short) run's results file
        old = json.loads(Path(args.summarize).read_text())
        res.data.update(machine=old["machine"], load_start=old["load_start"])
        args.trials, args.epochs = old["settings"]["trials"], old["settings"]["epochs"]
        args.repeats = old["settings"]["repeats"]
        summarize(res, old["runs"], list(old["runs"][0]), args, None)
        return
    runs: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="rtft-overhead-") as tmp:
        root = Path(tmp)
        spec = fixed_spec(args.trials, args.epochs, args.smoke, root, short)
        ways = list(args.ways)
        for r in range(args.repeats):
            order = ways[r % len(ways):] + ways[:r % len(ways)]  # rotate: no way always first
            got = {}
            for w in order:
                got[w] = run_way(w, spec, root)
                print(f"repeat {r + 1}/{args.repeats} {WAYS[w]}: {got[w]['wall_s']:.1f} s",
                      flush=True)
            runs.append(got)
            # Each finished repeat is on disk at once: a long run cut short keeps its numbers.
            res.write(settings={"trials": args.trials, "epochs": args.epochs,
                                "repeats": args.repeats, "concurrency": 2, "short": short},
                      runs=runs,
                      repeats_done=len(runs))
    summarize(res, runs, ways, args, spec)


def summarize(res: Results, runs: list[dict[str, dict[str, Any]]], ways: list[str],
              args: Any, spec: Spec | None) -> None:
    """Print the tables of `runs` (per repeat, per way) and write overhead.json."""
    def med(way: str, key: str) -> float:
        return median([x[way][key] for x in runs if way in x and key in x[way]])

    def med_list(way: str, key: str) -> float:
        return median([v for x in runs if way in x for v in x[way].get(key, [])])

    rows, summary = [], {}
    for w in ways:
        summary[w] = {"wall_s": med(w, "wall_s"), "ray_init_s": med(w, "ray_init_s"),
                      "driver_cpu_s": med(w, "driver_cpu_s"),
                      "first_start_s": med_list(w, "first"),
                      "later_start_s": med_list(w, "later"),
                      "setup_s": med_list(w, "setup"),
                      "report_ms_per_epoch": 1000 * median(
                          [x[w]["report_s"] / x[w]["epochs_seen"] for x in runs
                           if w in x and x[w].get("epochs_seen")]),
                      "checkpoints": med(w, "checkpoints")}
        s = summary[w]
        rows.append([WAYS[w], s["wall_s"], s["ray_init_s"] if w != "a" else None,
                     s["driver_cpu_s"], s["first_start_s"], s["later_start_s"], s["setup_s"],
                     s["report_ms_per_epoch"], s["checkpoints"]])
    ratios = {}
    for name, (num, den) in {"c/a": ("c", "a"), "c/b": ("c", "b"), "b/a": ("b", "a")}.items():
        if num in ways and den in ways:
            ratios[name] = median([x[num]["wall_s"] / x[den]["wall_s"] for x in runs])
            if all("ray_init_s" in x[num] for x in runs):
                ratios[name + " excl. Ray start"] = median(
                    [(x[num]["wall_s"] - x[num]["ray_init_s"])
                     / (x[den]["wall_s"] - x[den].get("ray_init_s", 0.0)) for x in runs])
    print(f"\n{args.trials} trials x {args.epochs} epochs, 2 at a time, median of "
          f"{len(runs)} repeats (seconds)")
    print(table(["way", "wall", "Ray start", "driver CPU", "first trial ready",
                 "next trial ready", "train() setup", "report ms/epoch", "checkpoints"], rows))
    if "c" in ways:
        print(f"Ray on_trial_start -> trainer ready (rtft): "
              f"{med_list('c', 'ray_start_to_ready'):.3f} s median")
    print()
    print(table(["ratio", "median", "target"],
                [[k, v, TARGETS.get(k)] for k, v in ratios.items()]))
    path = res.write(settings={"trials": args.trials, "epochs": args.epochs,
                               "repeats": args.repeats, "concurrency": 2,
                               "spec": spec.model_dump(mode="json") if spec else None},
                     summary=summary, ratios=ratios, targets=TARGETS, runs=runs,
                     repeats_done=len(runs))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
