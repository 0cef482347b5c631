"""Load: many short trials through `run_search`; does the driver's memory stay flat, and does
`rtft results` still answer quickly over the finished run?

    python bench/load.py --trials 200      # the full load test (~10+ minutes on 2 cores)
    python bench/load.py --smoke           # 4 trials, for CI
    python bench/load.py --bookkeeping --trials 100 1000 10000   # the driver's own cost

Each trial is a tiny fine-tune (resnet18 from scratch on 16 px digits, 100 training images,
1 epoch, no early stopping), several at a time. A thread samples the driver's resident memory
(/proc/self/status: VmRSS now, VmHWM the kernel's peak) every 0.1 s; the figures are taken as
the 50th and the last trial finish. Then `rtft results RUN_DIR` is timed twice: in a fresh
process (what a user waits for, interpreter start and imports included) and in-process
(reading the run and printing the table, imports warm).
Writes bench/results/load.json (full runs) with the machine description.

`--bookkeeping`: what the driver costs per trial when training costs nothing, as Ray's own
release test measures Tune (10,000 trials of 1 s). `run_search` runs as a user runs it, but in
this benchmark only the trainer is replaced (bench/plugins/instant_trainer) by one that reports
its epochs after a fixed sleep each (or at once). For each trial count, one fresh search:
driver CPU per trial, wall time against the sleep floor (the epochs the trials ran, times the
sleep, over the trials at a time), the driver's RSS as 10 %, 50 % and 100 % of the trials end,
and the bytes the driver wrote (/proc/self/io) and left in the run folder. Random sampling,
so that Optuna's TPE (whose cost grows with the trials; `bench/efficiency.py --parts asktell`)
does not hide the bookkeeping. Appends to bench/results/bookkeeping.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Run from a checkout without an install: the repository root is the package's home.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPEC = """\
name: load
model: {{arch: resnet18, weights: none}}
data: {{source: digits, image_size: 16, train_limit: 100, val_fraction: 0.15, test_fraction: 0.15}}
train: {{max_epochs: 1, seed: 0}}
search:
  lr: {{space: loguniform, low: 1.0e-4, high: 1.0e-1}}
  optimizer: {{space: choice, values: [sgd, adamw]}}
  batch_size: 32
  augment: none
searcher: {{sampler: tpe, seed: 0, n_startup_trials: 10}}
scheduler: {{type: none}}
run: {{num_samples: {n}, max_concurrent_trials: {c}, resources: {{cpu: {cpu}}},
       storage_path: {root}/runs}}
promote: {{dir: {root}/models}}
"""


def _status_mb() -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak so far) of this process, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024  # kB → MB
    return out


def _kind(p: Any) -> str:
    """A Ray process by what it is: gcs_server, raylet, a trial worker, an agent, ..."""
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # gone, or not ours to read
        return "other"
    if cmd.startswith("ray::") or "default_worker" in cmd:  # workers retitle themselves
        return "workers (trials)"
    for key in ("gcs_server", "raylet", "dashboard_agent", "runtime_env", "log_monitor",
                "monitor.py", "dashboard"):
        if key in cmd:
            return key
    return p.name()


class _Sampler(threading.Thread):
    """Samples VmRSS every `period` s (`max_rss_mb`: the highest value seen) and, every
    second, the CPU seconds of every process under this one (`cpu_by_kind`: Ray's GCS,
    raylet, agents, the trial workers), so a run says which part of Ray costs what."""

    def __init__(self, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.period, self.max_rss_mb = period, 0.0
        self._stop_event = threading.Event()
        self._cpu: dict[int, tuple[str, float]] = {}

    def _children_cpu(self) -> None:
        import ray  # noqa: F401  (puts its own psutil on sys.path where none is installed)

        # isort: split
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()
                kind = self._cpu[p.pid][0] if p.pid in self._cpu else _kind(p)
                self._cpu[p.pid] = (kind, t.user + t.system)
            except Exception:  # ended between the listing and the reading
                continue

    @property
    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, sec in self._cpu.values():
            out[kind] = round(out.get(kind, 0.0) + sec, 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def run(self) -> None:
        n = 0
        while not self._stop_event.is_set():
            self.max_rss_mb = max(self.max_rss_mb, _status_mb()["VmRSS"])
            if n % int(1 / self.period) == 0:
                self._children_cpu()
            n += 1
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class _Watch:
    """The search's echo: counts finished trials and takes the memory figures at `marks`.

    Ray pickles the Tuner's callbacks (and so this) into the run folder: the pickled copy
    leaves the sampler thread behind."""

    def __init__(self, marks: list[int], echo: Any) -> None:
        self.marks, self.echo, self.done = marks, echo, 0
        self.memory: list[dict[str, Any]] = []
        self.sampler = _Sampler()

    def __getstate__(self) -> dict[str, Any]:
        return {"marks": self.marks, "echo": print, "done": 0, "memory": [], "sampler": None}

    def __call__(self, text: str) -> None:
        if " after epoch " not in text:  # only the progress line of a finished trial
            return
        self.done += 1
        if self.done in self.marks and self.sampler is not None:
            self.memory.append({"trials": self.done, "t": time.perf_counter(), **_status_mb(),
                                "sampled_max_rss_mb": self.sampler.max_rss_mb})
            self.echo(f"[load] {self.done} trials done: RSS {self.memory[-1]['VmRSS']:.0f} MB,"
                      f" peak {self.memory[-1]['VmHWM']:.0f} MB")


def run(trials: int, concurrency: int, cpu: float, root: Path, echo: Any = print,
        import_check: bool = True) -> dict[str, Any]:
    """Run the load search under `root`; return the measured figures."""
    from raytune_ft.search.run import run_search
    from raytune_ft.spec.yaml_io import parse_spec

    spec = parse_spec(SPEC.format(n=trials, c=concurrency, cpu=cpu, root=root),
                      file="bench/load.py")
    watch = _Watch(sorted({min(50, trials), trials}), echo)
    watch.sampler.start()
    t0 = time.perf_counter()
    try:
        outcome = run_search(spec, echo=watch, quiet=True)
    finally:
        watch.sampler.stop()
    search_s = time.perf_counter() - t0
    after = {"trials": "after promotion", **_status_mb(),
             "sampled_max_rss_mb": watch.sampler.max_rss_mb}
    memory = watch.memory
    states: dict[str, int] = {}
    for r in outcome.records:
        key = "failed" if r.error else "ok"
        states[key] = states.get(key, 0) + 1

    # `rtft results` as a user runs it: a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t1 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raytune_ft.cli", "results",
                           str(outcome.run_dir)], capture_output=True, text=True, env=env)
    cli_s = time.perf_counter() - t1
    if proc.returncode != 0:
        raise RuntimeError(f"rtft results failed: {proc.stderr}")
    # The same command in this process (imports warm): the part that grows with the trials.
    from click.testing import CliRunner

    from raytune_ft.cli.main import main as cli_main

    t2 = time.perf_counter()
    res = CliRunner().invoke(cli_main, ["results", str(outcome.run_dir)],
                             catch_exceptions=False)
    inproc_s = time.perf_counter() - t2
    import_s = None
    if import_check:  # how much of the fresh process is interpreter start and imports
        t3 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import raytune_ft.cli, raytune_ft.search"],
                       check=True, env=env)
        import_s = round(time.perf_counter() - t3, 2)
    return {
        "trials": trials, "concurrency": concurrency, "cpu_per_trial": cpu,
        "records": len(outcome.records), "states": states, "promoted": len(outcome.promoted),
        "search_s": round(search_s, 1), "per_trial_s": round(search_s / trials, 2),
        "memory_mb": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in m.items()}
                      for m in [*memory, after]],
        "results_cli_s": round(cli_s, 2), "results_inprocess_s": round(inproc_s, 3),
        "import_cli_and_search_s": import_s,
        "results_first_line": res.output.splitlines()[0] if res.output else "",
        "run_dir": str(outcome.run_dir),
    }


BOOKKEEPING_SPEC = """\
name: bookkeeping-{n}
model: {{arch: resnet18, weights: none}}
data: {{source: digits, image_size: 16, train_limit: 100, val_fraction: 0.15, test_fraction: 0.15}}
train: {{max_epochs: {epochs}, seed: 0}}
search:
  lr: {{space: loguniform, low: 1.0e-4, high: 1.0e-1}}
  optimizer: {{space: choice, values: [sgd, adamw]}}
  batch_size: 32
searcher: {{sampler: random, seed: 0}}
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
run: {{num_samples: {n}, max_concurrent_trials: {c}, resources: {{cpu: {cpu}}},
       storage_path: {root}/runs}}
promote: {{dir: {root}/models}}
"""
PLUGIN = ROOT / "bench" / "plugins" / "instant_trainer"


def _written_bytes() -> int:
    """Bytes this process has caused to be written to storage so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes"))


def _folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes under `folder`, by its first-level entry."""
    out: dict[str, int] = {}
    for f in folder.rglob("*"):
        if f.is_file():
            top = f.relative_to(folder).parts[0]
            out[top] = out.get(top, 0) + f.stat().st_size
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def bookkeeping(trials: int, concurrency: int, epochs: int, sleep: float, root: Path,
                echo: Any = print) -> dict[str, Any]:
    """One search of `trials` instant trials (see the module's docstring); its figures."""
    # Before Ray starts: the workers inherit the environment, and so the plugin.
    os.environ["RTFT_BENCH_INSTANT"] = str(sleep)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PLUGIN), str(ROOT), os.environ.get("PYTHONPATH")]))
    from raytune_ft.search.run import run_search
    from raytune_ft.spec.yaml_io import parse_spec

    spec = parse_spec(BOOKKEEPING_SPEC.format(n=trials, c=concurrency, epochs=epochs,
                                              cpu=round(2 / concurrency, 4), root=root),
                      file="bench/load.py")
    watch = _Watch(sorted({max(1, trials // 10), max(1, trials // 2), trials}), echo)
    watch.sampler.start()
    load0, cpu0, written0 = os.getloadavg()[0], time.process_time(), _written_bytes()
    t0 = time.perf_counter()
    try:
        outcome = run_search(spec, echo=watch, quiet=True)
    finally:
        watch.sampler.stop()
    wall = time.perf_counter() - t0
    cpu, written = time.process_time() - cpu0, _written_bytes() - written0
    epochs_run = sum(r.epochs for r in outcome.records)
    floor = epochs_run * sleep / concurrency
    # Steady state: from the 10 % mark (Ray and the workers have started) to the last trial.
    (first, last) = (watch.memory[0], watch.memory[-1]) if watch.memory else ({}, {})
    share = (last.get("trials", 0) - first.get("trials", 0)) / trials
    steady = (last["t"] - first["t"]) / (floor * share) if floor and share else None
    files = _folder_bytes(outcome.run_dir)
    return {
        "trials": trials, "concurrency": concurrency, "epochs": epochs, "sleep_s": sleep,
        "records": len(outcome.records), "epochs_run": epochs_run,
        "wall_s": round(wall, 1), "floor_s": round(floor, 1),
        "wall_over_floor": round(wall / floor, 3) if floor else None,
        "steady_over_floor": round(steady, 3) if steady else None,
        "first_tenth_done_s": round(first["t"] - t0, 1) if first else None,
        "driver_cpu_s": round(cpu, 1), "driver_cpu_ms_per_trial": round(1000 * cpu / trials, 2),
        # CPU seconds of Ray's processes (last seen, sampled every second)
        "ray_cpu_s": watch.sampler.cpu_by_kind,
        "rss_mb": [{"trials": m["trials"], "VmRSS": round(m["VmRSS"], 1),
                    "at_s": round(m["t"] - t0, 1)}
                   for m in watch.memory],
        "driver_written_mb": round(written / 2**20, 2),
        "driver_written_kb_per_trial": round(written / 1024 / trials, 2),
        "run_folder_mb": round(sum(files.values()) / 2**20, 2),
        "run_folder_kb_per_trial": round(sum(files.values()) / 1024 / trials, 2),
        "run_folder_by_entry_kb": {k: round(v / 1024, 1) for k, v in files.items()},
        "load_avg_start": round(load0, 2), "load_avg_end": round(os.getloadavg()[0], 2),
    }


def machine() -> dict[str, Any]:
    import ray
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry; returns the figures (also printed as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, nargs="+", default=[200],
                    help="trial count(s); --bookkeeping runs one search per count")
    ap.add_argument("--bookkeeping", action="store_true",
                    help="instant trials: the driver's own cost per trial (see above)")
    ap.add_argument("--epochs", type=int, default=4, help="--bookkeeping: epochs per trial")
    ap.add_argument("--sleep", type=float, default=0.5,
                    help="--bookkeeping: seconds per epoch (0: report at once)")
    ap.add_argument("--smoke", action="store_true", help="4 trials (CI)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--cpu", type=float, default=0.5, help="CPUs per trial")
    ap.add_argument("--root", type=Path, default=None,
                    help="where the run goes (default: a temporary folder, removed after)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON result file (default: bench/results/load.json for full runs)")
    args = ap.parse_args(argv)
    if args.bookkeeping:
        return _bookkeeping_main(args)
    trials = 4 if args.smoke else args.trials[0]
    root = args.root or Path(tempfile.mkdtemp(prefix="rtft-load-"))
    try:
        figures = run(trials, args.concurrency, args.cpu, root, import_check=not args.smoke)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    figures["machine"] = machine()
    out = args.out or (None if args.smoke else
                       ROOT / "bench" / "results" / "load.json")
    if out is not None:
        out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
    return figures


def _bookkeeping_main(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out or ROOT / "bench" / "results" / "bookkeeping.json"
    if args.smoke:
        args.trials, out = [16], args.out
    concurrency = args.concurrency if args.concurrency != 4 else 8  # Ray's test: many at once
    done = json.loads(out.read_text()) if out is not None and out.exists() else {"runs": []}
    for n in args.trials:
        root = args.root or Path(tempfile.mkdtemp(prefix="rtft-bookkeeping-"))
        try:
            figures = bookkeeping(n, concurrency, args.epochs, args.sleep, root)
        finally:
            if args.root is None:
                shutil.rmtree(root, ignore_errors=True)
        print(json.dumps(figures, indent=1), flush=True)
        done["runs"] = [r for r in done["runs"] if (r["trials"], r["sleep_s"], r["epochs"])
                        != (n, args.sleep, args.epochs)] + [figures]
        done["machine"] = machine()
        if out is not None:  # after each count: a long series keeps what it has measured
            out.write_text(json.dumps(done, indent=1) + "\n")
    return done


if __name__ == "__main__":
    main()
