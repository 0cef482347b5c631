"""Load: many short trials through `run_search`; does the driver's memory stay flat, and does
`rtft results` still answer quickly over the finished run?

    python bench/load.py --trials 200      # the full load test (~10+ minutes on 2 cores)
    python bench/load.py --smoke           # 4 trials, for CI

Each trial is a tiny fine-tune (resnet18 from scratch on 16 px digits, 100 training images,
1 epoch, no early stopping), several at a time. A thread samples the driver's resident memory
(/proc/self/status: VmRSS now, VmHWM the kernel's peak) every 0.1 s; the figures are taken as
the 50th and the last trial finish. Then `rtft results RUN_DIR` is timed twice: in a fresh
process (what a user waits for, interpreter start and imports included) and in-process
(reading the run and printing the table, imports warm).
Writes bench/results/load.json (full runs) with the machine description.
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


class _Sampler(threading.Thread):
    """Samples VmRSS every `period` s; `max_rss_mb` is the highest value seen."""

    def __init__(self, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.period, self.max_rss_mb = period, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.max_rss_mb = max(self.max_rss_mb, _status_mb()["VmRSS"])
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
            self.memory.append({"trials": self.done, **_status_mb(),
                                "sampled_max_rss_mb": self.sampler.max_rss_mb})
            self.echo(f"[load] {self.done} trials done: RSS {self.memory[-1]['VmRSS']:.0f} MB,"
                      f" peak {self.memory[-1]['VmHWM']:.0f} MB")


def run(trials: int, concurrency: int, cpu: float, root: Path, echo: Any = print,
        import_check: bool = True) -> dict[str, Any]:
    """Run the load search under `root`; return the measured figures."""
    from raytune_ft.search import run_search
    from raytune_ft.spec_io import parse_spec

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

    from raytune_ft.cli import main as cli_main

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


def machine() -> dict[str, Any]:
    import ray
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry; returns the figures (also printed as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="4 trials (CI)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--cpu", type=float, default=0.5, help="CPUs per trial")
    ap.add_argument("--root", type=Path, default=None,
                    help="where the run goes (default: a temporary folder, removed after)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON result file (default: bench/results/load.json for full runs)")
    args = ap.parse_args(argv)
    trials = 4 if args.smoke else args.trials
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


if __name__ == "__main__":
    main()
