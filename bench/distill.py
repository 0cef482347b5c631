"""Distillation that pays: the same small-student search with its teacher and without.

The teacher is what `rtft search search_spaces/resnet.yaml` promotes (resnet18 from rtft:mnist,
500 training digits), built here once (or `--teacher MODEL_DIR`). The student search is
`search_spaces/distill.yaml` (mobilenet_v3_small from rtft:mnist, `distill_alpha` and
`distill_temperature` searched beside the fine-tuning knobs), run two ways at the same trial
budget: (a) **student+teacher**, as shipped; (b) **student alone**, the same spec without
`model.teacher` and without the two distillation knobs. Each at two data sizes
(`data.train_limit` 100 and 500: the same validation and held-out test images, the first N
of the same class-balanced training order, so the 100 are among the teacher's 500) and
several seeds (`searcher.seed` and `train.seed`). Every search is `rtft search` in a fresh
process, one at a time, and promotes its best trial (held-out test accuracy, once).

Reported per search: held-out test accuracy of the promoted model, its best val_acc, epochs
trained, the search's wall seconds, the load before and after; at the end, every promoted model
(teacher and students) is loaded and measured side by side in this process (parameters,
latency at batch 1 and 32 on this CPU, 1 thread as a trial measures, median of repeated
forwards: :func:`raytune_ft.model.cost.measure`; every model in turn, twice, the lower
kept), and the table gives each arm's means with ratios against the student alone.

Resumable: each finished search is kept in `<out>/distill_searches.json` (the run and model
folders in `--work`); `--max-searches N` stops after N new searches, so a shared machine can
take turns (`flock LOCK python bench/distill.py --max-searches 1`, repeated until it prints
the table).

    python bench/distill.py                            # seeds 0 1 2, train_limit 100 and 500
    python bench/distill.py --seeds 0 1 2 3 4 --max-searches 1
    python bench/distill.py --smoke                     # tiny task, one seed, one size
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SMOKE_OVERRIDES, Results, load_average, out_dir_arg, table  # noqa: E402

SPEC = ROOT / "search_spaces" / "distill.yaml"
TEACHER_SPEC = ROOT / "search_spaces" / "resnet.yaml"
ARMS = ("student+teacher", "student alone")
STATE = "distill_searches.json"


def _search(spec_file: Path, cwd: Path, sets: list[str]) -> tuple[float, list[float],
                                                                   list[float]]:
    """`rtft search` in a fresh process: (wall seconds, load before, load after)."""
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    before = load_average()
    t0 = time.monotonic()
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "raytune_ft.cli", "search", str(spec_file),
                           "--quiet", *args], cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rtft search {spec_file} failed:\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-3000:]}")
    return round(wall, 1), before, load_average()


def _outcome(work: Path, name: str) -> dict[str, Any]:
    """What a finished search's run folder and promoted model say."""
    trials = json.loads((work / "runs" / name / "trials.json").read_text())
    model = work / "models" / name / "v1"
    metrics = json.loads((model / "metrics.json").read_text())
    hist = [h for t in trials for h in t["history"]]
    return {"model": str(model), "trials": len(trials), "epochs": len(hist),
            "best_val_acc": max(h["val_acc"] for h in hist), "test_acc": metrics["test"]["acc"],
            "promoted_trial": metrics["trial_id"], "arch": metrics["arch"],
            "params": {k: v for k, v in metrics["params"].items()
                       if k in ("distill_alpha", "distill_temperature")},
            "trial_cost": metrics.get("cost"), "sha256": metrics["sha256"]}


def _student_spec(work: Path, name: str, arm: str, size: int, seed: int,
                  teacher: Path) -> Path:
    """distill.yaml for one search: the arm, the data size, the seeds, folders under work."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["name"] = name
    spec["data"]["train_limit"] = size
    spec["searcher"]["seed"] = seed
    spec["train"]["seed"] = seed
    spec["run"]["storage_path"] = str(work / "runs")
    spec["promote"]["dir"] = str(work / "models")
    if arm == "student+teacher":
        spec["model"]["teacher"] = str(teacher)
    else:  # the same search, no teacher: its two knobs go with it
        del spec["model"]["teacher"]
        for knob in ("distill_alpha", "distill_temperature"):
            spec["search"].pop(knob)
    path = work / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _measure(model_dirs: list[str], rounds: int = 2) -> dict[str, dict[str, Any]]:
    """Parameters and latency at batch 1 and 32 of each promoted model, here, 1 thread (as a
    trial measures): every model in turn, `rounds` times, the lowest median kept (a shared
    machine's load comes and goes; no model measured in only its quiet or busy moments)."""
    import torch

    from raytune_ft.model.cost import measure
    from raytune_ft.promote import load_promoted

    models = {d: load_promoted(d) for d in dict.fromkeys(model_dirs)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, dict[str, Any]] = {}
    try:
        for _ in range(rounds):
            for d, m in models.items():
                c = measure(m.model, int(m.config["spec"]["data"]["image_size"]), cache=False)
                was = out.get(d, {})
                out[d] = {"params": c.params, "flops": c.flops,
                          "latency_b1_ms": round(min(c.latency_b1_ms, was.get(
                              "latency_b1_ms", float("inf"))), 3),
                          "latency_b32_ms": round(min(c.latency_b32_ms, was.get(
                              "latency_b32_ms", float("inf"))), 3)}
    finally:
        torch.set_num_threads(threads)
    return out


def _spec_value(path: Path, key: str, sets: list[str]) -> Any:
    """A field of a spec file, as `--set` overrides leave it."""
    for s in reversed(sets):
        if s.startswith(f"{key}="):
            return yaml.safe_load(s.split("=", 1)[1])
    value: Any = yaml.safe_load(path.read_text())
    for part in key.split("."):
        value = value[part]
    return value


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _summary(state: dict[str, Any], sizes: list[int], seeds: list[int],
             costs: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The table (one block per data size: teacher, student+teacher, student alone, with
    ratios against the student alone) and the same figures as a dict."""
    t = state["teacher"]
    tc = costs[t["model"]]
    head = ["train", "model", "test acc", "per seed", "Δ pp vs alone", "Mparams", "×",
            "ms b1", "×", "ms b32", "×", "search s", "×"]
    rows, out = [], {}
    for size in sizes:
        arms: dict[str, dict[str, Any]] = {}
        for arm in ARMS:
            runs = [state["searches"][f"{size}/{seed}/{arm}"] for seed in seeds]
            cs = [costs[r["model"]] for r in runs]
            arms[arm] = {"test_acc": _mean([r["test_acc"] for r in runs]),
                         "per_seed": [round(r["test_acc"], 4) for r in runs],
                         "best_val_acc": _mean([r["best_val_acc"] for r in runs]),
                         "params": _mean([c["params"] for c in cs]),
                         "latency_b1_ms": _mean([c["latency_b1_ms"] for c in cs]),
                         "latency_b32_ms": _mean([c["latency_b32_ms"] for c in cs]),
                         "wall_s": _mean([r["wall_s"] for r in runs]),
                         "epochs": _mean([r["epochs"] for r in runs]),
                         "distill_alpha": [r["params"].get("distill_alpha") for r in runs]}
        arms["teacher"] = {"test_acc": t["test_acc"], "per_seed": [round(t["test_acc"], 4)],
                           "params": tc["params"], "latency_b1_ms": tc["latency_b1_ms"],
                           "latency_b32_ms": tc["latency_b32_ms"], "wall_s": t["wall_s"],
                           "train_limit": t.get("train_limit")}
        alone = arms["student alone"]
        for arm in ("teacher", *ARMS):
            a = arms[arm]
            a["ratios_vs_alone"] = {k: round(a[k] / alone[k], 3) for k in
                                    ("params", "latency_b1_ms", "latency_b32_ms", "wall_s")}
            a["test_acc_pp_vs_alone"] = round(100 * (a["test_acc"] - alone["test_acc"]), 2)
            r = a["ratios_vs_alone"]
            label = f"teacher ({t['arch']}, {t.get('train_limit')} imgs)" if arm == "teacher" \
                else arm
            rows.append([size, label, round(a["test_acc"], 4),
                         " ".join(f"{x:.3f}" for x in a["per_seed"]),
                         f"{a['test_acc_pp_vs_alone']:+.2f}", round(a["params"] / 1e6, 2),
                         r["params"], a["latency_b1_ms"], r["latency_b1_ms"],
                         a["latency_b32_ms"], r["latency_b32_ms"], round(a["wall_s"], 1),
                         r["wall_s"]])
        st = arms["student+teacher"]
        arms["student+teacher vs teacher"] = {
            "test_acc_pp": round(100 * (st["test_acc"] - t["test_acc"]), 2),
            "speedup_b1": round(tc["latency_b1_ms"] / st["latency_b1_ms"], 2),
            "params_ratio": round(st["params"] / tc["params"], 3)}
        out[str(size)] = arms
    return table(head, rows), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--teacher", type=Path, default=None,
                    help="a promoted teacher (default: built here by resnet.yaml's search)")
    ap.add_argument("--work", type=Path, default=None,
                    help="run and model folders (default: $TMPDIR/rtft-bench-distill)")
    ap.add_argument("--max-searches", type=int, default=None,
                    help="stop after this many new searches (resumable)")
    ap.add_argument("--smoke", action="store_true", help="tiny task, one seed, one size")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = out_dir_arg(args.out)
    smoke_tmp = tempfile.TemporaryDirectory(prefix="rtft-distill-") if args.smoke else None
    work = (Path(smoke_tmp.name) if smoke_tmp else
            (args.work or Path(tempfile.gettempdir()) / "rtft-bench-distill")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seeds, sizes = ([0], [80]) if args.smoke else (args.seeds, args.sizes)
    # The tiny task: 16 px, no pretrained weights, 1 epoch, 2 trials (teacher and students).
    smoke_sets = [s for s in SMOKE_OVERRIDES if not s.startswith("data.train_limit=")] + \
        ["run.num_samples=2"] if args.smoke else []
    state_file = out / (f"distill_searches{'_smoke' if args.smoke else ''}.json")
    state = json.loads(state_file.read_text()) \
        if state_file.is_file() and not args.smoke else {}
    state.setdefault("searches", {})
    # The spec's content, not its comments: a reworded comment keeps the searches made.
    spec_sha = hashlib.sha256(json.dumps(yaml.safe_load(SPEC.read_text()),
                                         sort_keys=True).encode()).hexdigest()
    if state.get("spec_sha256") != spec_sha:  # searches of another distill.yaml do not count
        state["searches"], state["spec_sha256"] = {}, spec_sha
    budget = args.max_searches if args.max_searches is not None else 10**9
    res = Results("distill", smoke=args.smoke, out_dir=out)

    def spend() -> None:
        nonlocal budget
        budget -= 1
        _save(state_file, state)
        if budget <= 0 and not done():
            print(f"stopping after --max-searches {args.max_searches}; run again to go on",
                  flush=True)
            raise SystemExit(0)

    def done() -> bool:
        return "teacher" in state and all(f"{size}/{seed}/{arm}" in state["searches"]
                                          for size in sizes for seed in seeds for arm in ARMS)

    # The teacher: given, kept from an earlier invocation, or built here.
    if args.teacher is not None:
        from raytune_ft.promote import load_promoted

        m = load_promoted(args.teacher)
        state["teacher"] = {"model": str(args.teacher.resolve()), "wall_s": None,
                            "test_acc": m.metrics["test"]["acc"], "arch": m.metrics["arch"],
                            "sha256": m.metrics["sha256"],
                            "train_limit": m.config["spec"]["data"].get("train_limit")}
    elif "teacher" not in state or not Path(state["teacher"]["model"]).is_dir():
        print(f"teacher: rtft search {TEACHER_SPEC.name} (load {load_average()[0]})", flush=True)
        sets = ["name=teacher", f"run.storage_path={work / 'runs'}",
                f"promote.dir={work / 'models'}", *(SMOKE_OVERRIDES + ["run.num_samples=2"]
                                                    if args.smoke else [])]
        wall, before, after = _search(TEACHER_SPEC, work, sets)
        o = _outcome(work, "teacher")
        state["teacher"] = {**o, "wall_s": wall, "load_before": before, "load_after": after,
                            "train_limit": _spec_value(TEACHER_SPEC, "data.train_limit",
                                                       sets)}
        state["searches"] = {}  # students of another teacher do not count
        spend()
    teacher = Path(state["teacher"]["model"])
    for seed in seeds:
        for size in sizes:
            for arm in ARMS:
                key = f"{size}/{seed}/{arm}"
                if key in state["searches"]:
                    continue
                name = f"{'distilled' if arm == 'student+teacher' else 'alone'}-{size}-s{seed}"
                for folder in (work / "runs" / name, work / "models" / name):
                    shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier try
                spec_file = _student_spec(work, name, arm, size, seed, teacher)
                print(f"{key}: rtft search (load {load_average()[0]})", flush=True)
                wall, before, after = _search(spec_file, work, smoke_sets)
                state["searches"][key] = {**_outcome(work, name), "wall_s": wall,
                                          "load_before": before, "load_after": after,
                                          "arm": arm, "train_limit": size, "seed": seed,
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime())}
                print(f"  test acc {state['searches'][key]['test_acc']:.4f}, {wall} s "
                      f"(load {after[0]})", flush=True)
                spend()
    # Every promoted model measured here, one after the other.
    print(f"measuring {1 + len(state['searches'])} promoted models (load {load_average()[0]})",
          flush=True)
    models = [state["teacher"]["model"], *(state["searches"][f"{size}/{seed}/{arm}"]["model"]
                                          for size in sizes for seed in seeds for arm in ARMS)]
    costs = _measure(models)
    text, summary = _summary(state, sizes, seeds, costs)
    print(text)
    for size in sizes:
        v = summary[str(size)]["student+teacher vs teacher"]
        d = summary[str(size)]["student+teacher"]["test_acc_pp_vs_alone"]
        print(f"train_limit {size}: the teacher's help {d:+.2f} pp of test accuracy (mean of "
              f"{len(seeds)} seeds); student+teacher vs teacher: {v['test_acc_pp']:+.2f} pp, "
              f"{v['speedup_b1']}x faster at batch 1, {v['params_ratio']}x the parameters")
    path = res.write(spec=str(SPEC), teacher=state["teacher"], sizes=sizes, seeds=seeds,
                     searches=state["searches"], costs=costs, summary=summary, table=text,
                     measured_load=load_average())
    print(f"written: {path}")
    if smoke_tmp is not None:
        smoke_tmp.cleanup()


if __name__ == "__main__":
    main()
