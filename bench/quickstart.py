"""How long the README's quick start takes: `rtft search search_spaces/resnet.yaml --set
run.num_samples=6`, run as a new user runs it, in a fresh HOME (so the first run pretrains the
`rtft:` backbone, cached under ~/.cache/rtft) and then again with that cache warm.

    python bench/quickstart.py            # cold then warm, in a fresh HOME (~4 min on 2 cores)
    python bench/quickstart.py --smoke    # the smoke overrides, one trial: checks it runs
    python bench/quickstart.py --install  # also time `pip install -e .` in a fresh venv first

Prints both wall times and warm/cold (the baseline is the first run a user makes), with the
load before and after; writes bench/results/quickstart.json. Time it on a quiet machine
(`uptime` below 2): these are seconds, not epochs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_SPEC,
    ROOT,
    SMOKE_OVERRIDES,
    Results,
    load_average,
    out_dir_arg,
    table,
)

QUICK_START = ["run.num_samples=6"]  # README.md, "Quick start"


def run_once(home: Path, work: Path, sets: list[str]) -> tuple[float, str]:
    """Wall seconds of one `rtft search` in `work` with HOME=`home`, and its last line."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RTFT_CACHE",
                                                            "TORCH_HOME")}
    # HOME only: Ray's session folder under a long TMPDIR exceeds the socket path limit.
    env["HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "raytune_ft.cli", "search", str(DEFAULT_SPEC), "--quiet",
           *[a for s in [*sets, f"run.storage_path={work}/rtft_runs",
                         f"promote.dir={work}/models"] for a in ("--set", s)]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"rtft search failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return seconds, (p.stdout.strip().splitlines() or ["?"])[-1]


def time_install(tmp: Path) -> float:
    """Wall seconds of the README's `python -m pip install -e .` in a fresh virtual environment
    (wheels from pip's cache where it has them, as on a machine that installed before)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    t0 = time.perf_counter()
    p = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e",
                        str(ROOT)], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"pip install failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="smoke overrides, one trial")
    ap.add_argument("--install", action="store_true", help="time pip install -e . first")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    sets = [*SMOKE_OVERRIDES, "run.num_samples=1"] if args.smoke else QUICK_START
    res = Results("quickstart", smoke=args.smoke, out_dir=out_dir_arg(args.out))
    tmp = Path(tempfile.mkdtemp(prefix="rtft-quickstart-"))
    try:
        home, rows, figures, cold = tmp / "home", [], {}, 0.0
        if args.install:
            load = load_average()
            figures["install"] = {"seconds": round(time_install(tmp), 1), "load_before": load,
                                  "load_after": load_average()}
            print(f"pip install -e . in a fresh venv: {figures['install']['seconds']} s "
                  f"(load before {load[0]})")
        for name in ("cold", "warm"):  # cold: a fresh HOME, so the backbone is pretrained
            load = load_average()
            work = tmp / name
            work.mkdir()
            seconds, last = run_once(home, work, sets)
            figures[name] = {"seconds": round(seconds, 1), "load_before": load,
                             "load_after": load_average(), "last_line": last}
            cold = cold if name == "warm" else seconds
            rows.append([name, seconds, seconds / cold, load[0]])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"rtft search {DEFAULT_SPEC.relative_to(ROOT)} " + " ".join(f"--set {s}" for s in sets))
    print(table(["run", "wall s", "x cold", "load before"], rows))
    print(f"written: {res.write(overrides=sets, figures=figures)}")


if __name__ == "__main__":
    main()
