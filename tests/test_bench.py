"""The benchmark scripts run from a checkout (their --smoke modes) and write what they claim.

No timing is asserted: only that each script runs end to end in a fresh process and that its
results JSON holds the machine description, the load, and every figure its table prints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

BENCH = ROOT / "bench"


def _run(script: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--out", str(out),
                           *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads((out / f"{script.removesuffix('.py')}.json").read_text())
    assert data["smoke"] is True
    m = data["machine"]
    assert m["cpus"] >= 1 and m["torch"] and m["ray"] and m["optuna"]
    assert len(data["load_start"]) == 3 and len(data["load_end"]) == 3
    return data | {"_stdout": proc.stdout}


@pytest.mark.slow
def test_overhead_smoke(tmp_path: Path) -> None:
    data = _run("overhead.py", tmp_path)
    assert set(data["summary"]) == {"a", "b", "c"}
    for way, s in data["summary"].items():
        assert s["wall_s"] > 0 and s["driver_cpu_s"] > 0, way
    run = data["runs"][0]
    # Every way ran both trials, and the trainer's timestamps were seen from each of them.
    assert all(run[w]["trials_seen"] == 2 for w in "abc"), run
    assert run["c"]["ray_init_s"] > 0 and len(run["c"]["ray_start_to_ready"]) == 2
    assert {"c/a", "c/b"} <= set(data["ratios"])
    assert "(c) rtft run_search" in data["_stdout"]


@pytest.mark.slow
def test_trainer_smoke(tmp_path: Path) -> None:
    data = _run("trainer.py", tmp_path)
    cpu = data["cpu"]
    assert cpu["ours_img_s"] > 0 and cpu["hand_img_s"] > 0 and cpu["ratio"] > 0
    assert cpu["checkpoint_save_s"] > 0 and 0 < cpu["checkpoint_share"] < 1
    assert cpu["checkpoint_mb"] > 1  # a resnet18 with its optimizer state
    import torch

    if torch.cuda.is_available():
        assert data["gpu"]["ours_img_s"] > 0
    else:
        assert data["gpu"] == {"skipped": "no CUDA device"}


@pytest.mark.slow
def test_efficiency_smoke(tmp_path: Path) -> None:
    data = _run("efficiency.py", tmp_path)
    pool = [json.loads(x) for x in
            (tmp_path / "efficiency_pool_smoke.jsonl").read_text().splitlines()]
    # 3 spaces x 3, and 2 of each task of the default space (mobilenet, few100, scratch)
    assert len(pool) == 15 and all(len(e["curve"]) == 2 for e in pool)
    assert {e["space"] for e in pool} == {"default", "large", "sibling", "mobilenet",
                                          "few100", "scratch"}
    for space in ("default", "large"):
        e = data["efficiency"][space]
        assert set(e["methods"]) == {"random full", "random+asha", "tpe+asha (ray: last)",
                                     "tpe+asha", "gp+asha", "cmaes+asha", "tpe+asha warm"}
        assert e["target"] == pytest.approx(e["pool_best"] - 0.005)
        for r in e["methods"].values():
            assert len(r["epochs_to_good"]) == 2 and r["trials"] >= 1
        # Ray's rule tells every trial COMPLETE; the fidelity rule tells each trial once.
        assert e["methods"]["tpe+asha (ray: last)"]["told"]["PRUNED"] == 0
        fid = e["methods"]["tpe+asha"]
        assert sum(fid["told"].values()) == pytest.approx(fid["trials"])
        assert len(e["best_so_far_median"]["tpe+asha"]) == e["budget_epochs"]
        # ASHA stops trials early, so within the same epoch budget it starts more of them.
        assert e["methods"]["random+asha"]["trials"] >= e["methods"]["random full"]["trials"]
        assert all(v > 0 for v in data["ask_tell_ms"][space].values())
    assert data["live"] == "skipped"
    # A second run reuses the recorded pool instead of training again.
    again = _run("efficiency.py", tmp_path, "--parts", "replay")
    assert "recording" not in again["_stdout"]


@pytest.mark.slow
def test_transfer_smoke(tmp_path: Path) -> None:
    """Leave-one-task-out: every task's table has every method, regrets are fractions, and
    the portfolio replayed on a task was built without that task's pool."""
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(BENCH / "transfer.py"), "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "efficiency.json").read_text())
    assert set(data["tasks"]) == {"default", "sibling", "mobilenet", "few100", "scratch"}
    names = {"random full", "random+asha", "tpe+asha (ray: last)", "previous default",
             "rtft default", "rtft default, no portfolio", "rtft default, no hedging"}
    for task, t in data["tasks"].items():
        assert set(t["methods"]) == names, task
        for m, r in t["methods"].items():
            assert 0 <= r["regret_25_median"] <= 1 and r["seeds"] == 2, (task, m)
            assert r["regret_full_median"] <= r["regret_25_median"] + 1e-9, (task, m)
    # The portfolio replayed on a task is the greedy one of the other tasks' pools only.
    sys.path.insert(0, str(BENCH))
    try:
        import transfer
    finally:
        sys.path.remove(str(BENCH))
    specs, pools, _ = transfer.load_pools(True, tmp_path)  # recorded above: read, not trained
    k = data["chosen"]["K"]
    for task, t in data["tasks"].items():
        others = {n: p for n, p in pools.items() if n != task}
        assert t["portfolio_indices_loto"] == transfer.greedy_portfolio(
            others, k, data["chosen"]["objective"]), task
    assert set(data["average"]) == names
    assert data["chosen"]["K"] in (1, 2) and data["chosen"]["brackets"] in (1, 2)
    assert "average over tasks" in proc.stdout


@pytest.mark.slow
def test_live_default_smoke(tmp_path: Path) -> None:
    data = _run("live_default.py", tmp_path)
    arms = {r["arm"]: r for r in data["runs"]}
    assert set(arms) == {"rtft default", "random full"}
    assert all(0 <= r["test_acc"] <= 1 and r["trials"] == 3 for r in arms.values())
    assert set(data["default_at_least_random"]) == {"mnist-scratch/0"}


@pytest.mark.slow
def test_gpu_smoke(tmp_path: Path) -> None:
    import torch

    data = _run("gpu.py", tmp_path)
    if torch.cuda.is_available():
        assert data["summary"]["1"]["total_img_s"] > 0
    else:
        assert data["skipped"] == "no CUDA device"
        assert "skipped" in data["_stdout"]



# Load: bench/load.py in smoke mode (the full run is `python bench/load.py --trials 200`).
@pytest.mark.slow
def test_load_bench_smoke(ray_session, tmp_path: Path) -> None:  # noqa: ANN001
    spec = importlib.util.spec_from_file_location("rtft_bench_load", ROOT / "bench" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    figures = load.main(["--smoke", "--root", str(tmp_path), "--out",
                         str(tmp_path / "load.json")])
    assert figures["records"] == 4 and figures["states"] == {"ok": 4}
    assert figures["promoted"] == 1
    assert figures["results_first_line"] == "4 trials: 4 completed"
    marks = [m["trials"] for m in figures["memory_mb"]]
    assert marks == [4, "after promotion"]
    assert all(m["VmHWM"] >= m["VmRSS"] > 0 for m in figures["memory_mb"])
    assert json.loads((tmp_path / "load.json").read_text())["trials"] == 4


@pytest.mark.slow
def test_which_model_smoke(tmp_path: Path) -> None:
    data = _run("which_model.py", tmp_path)
    [run] = data["runs"]
    for arm in ("choice", "separate"):
        x = run[arm]
        assert x["trials"] == 2 and x["epochs"] >= 2 and x["trial_s"] > 0, x
        assert x["promoted_arch"] in data["archs"] and 0 <= x["test_acc"] <= 1
    # one search per architecture: each got its share of the trials
    assert run["separate"]["trials_by_arch"] == {a: 1 for a in data["archs"]}
    assert set(data["ratios"]) == {"epochs", "trial_s", "wall_s"}
    assert "(b) one per arch" in data["_stdout"]


@pytest.mark.slow
def test_distill_smoke(tmp_path: Path) -> None:
    """A tiny teacher, then the student search with it and without: each promoted, measured,
    and set against the student alone."""
    data = _run("distill.py", tmp_path)
    assert data["sizes"] == [80] and data["seeds"] == [0]
    assert set(data["searches"]) == {"80/0/student+teacher", "80/0/student alone"}
    assert data["teacher"]["wall_s"] > 0 and 0 <= data["teacher"]["test_acc"] <= 1
    arms = data["summary"]["80"]
    for arm in ("teacher", "student+teacher", "student alone"):
        a = arms[arm]
        assert 0 <= a["test_acc"] <= 1 and a["params"] > 0 and a["latency_b1_ms"] > 0, arm
        assert a["latency_b32_ms"] > 0 and a["wall_s"] > 0, arm
        assert set(a["ratios_vs_alone"]) == {"params", "latency_b1_ms", "latency_b32_ms",
                                             "wall_s"}
    assert arms["student alone"]["ratios_vs_alone"]["params"] == 1.0
    assert arms["teacher"]["params"] > arms["student+teacher"]["params"]
    assert "student alone" in data["_stdout"] and "student+teacher vs teacher" in data["_stdout"]


@pytest.mark.slow
def test_quickstart_smoke(tmp_path: Path) -> None:
    """Two real searches, the first in a fresh HOME: both finish and are timed."""
    data = _run("quickstart.py", tmp_path)
    figures = data["figures"]
    assert set(figures) == {"cold", "warm"}
    assert all(f["seconds"] > 0 and f["last_line"].startswith("promoted model:")
               for f in figures.values()), figures
