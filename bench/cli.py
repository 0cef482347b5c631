"""How fast the command line answers: `rtft --help`, `rtft results RUN`, `rtft validate`, each
the median of fresh processes (interpreter start and imports included: what a user waits for),
beside `python -c pass` (the interpreter alone) as the baseline.

    python bench/cli.py                   # 5 repeats; builds a tiny finished run first (~40 s)
    python bench/cli.py --run RUN_DIR     # time `rtft results` on an existing run instead
    python bench/cli.py --smoke           # 1 repeat, for CI

Targets (issue 17): --help and results under 0.5 s; validate under 1.5 s unless it must
build the model to count its stages (it does: see bench/README.md, "Fast at both ends").
Also records which of torch, torchvision and ray each command imported.
Writes bench/results/cli.json with the machine and the load.
"""

from __future__ import annotations

import argparse
import ast
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
    median,
    out_dir_arg,
    table,
)

TARGETS = {"--help": 0.5, "results": 0.5, "validate": 1.5}
# Run in the timed process after the command: which heavy modules it loaded.
PROBE = ("import sys, runpy; sys.argv = ['rtft', *{args!r}]\n"
         "try:\n    runpy.run_module('raytune_ft.cli', run_name='__main__')\n"
         "except SystemExit: pass\n"
         "print('LOADED', sorted(m for m in ('torch', 'torchvision', 'ray') "
         "if m in sys.modules), file=sys.stderr)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def time_command(argv: list[str], repeats: int) -> list[float]:
    """Wall seconds of `argv` in `repeats` fresh processes (output discarded)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                       cwd=ROOT, check=False)
        out.append(time.perf_counter() - t0)
    return out


def loaded(args: list[str]) -> list[str]:
    """The heavy modules `rtft ARGS` imports (one extra, untimed run)."""
    p = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True,
                       text=True, env=_env(), cwd=ROOT, check=False)
    line = next((x for x in p.stderr.splitlines() if x.startswith("LOADED")), "LOADED ?")
    return ast.literal_eval(line.removeprefix("LOADED "))


def tiny_run(root: Path) -> Path:
    """A finished run of one tiny trial (a real search), for `rtft results` to read."""
    sets = [*SMOKE_OVERRIDES, "run.num_samples=1", f"run.storage_path={root}/runs",
            f"promote.dir={root}/models", "name=cli-bench"]
    cmd = [sys.executable, "-m", "raytune_ft.cli", "search", str(DEFAULT_SPEC), "--quiet",
           *[a for s in sets for a in ("--set", s)]]
    subprocess.run(cmd, check=True, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    return root / "runs" / "cli-bench"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--run", type=Path, default=None, help="a finished run for `rtft results`")
    ap.add_argument("--smoke", action="store_true", help="1 repeat, no results file")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    tmp = None if args.run else Path(tempfile.mkdtemp(prefix="rtft-cli-bench-"))
    res = Results("cli", smoke=args.smoke, out_dir=out_dir_arg(args.out))
    try:
        run = args.run or tiny_run(tmp)
        rtft = [sys.executable, "-m", "raytune_ft.cli"]
        commands = {"--help": ["--help"], "results": ["results", str(run)],
                    "validate": ["validate", str(DEFAULT_SPEC)]}
        base = median(time_command([sys.executable, "-c", "pass"], repeats))
        rows, figures = [], {"python -c pass": round(base, 3)}
        for name, rest in commands.items():
            t = median(time_command([*rtft, *rest], repeats))
            heavy = loaded(rest)
            figures[name] = {"median_s": round(t, 3), "over_python": round(t / base, 1),
                             "target_s": TARGETS[name], "met": t <= TARGETS[name],
                             "imports": heavy}
            rows.append([f"rtft {name}", t, t / base, TARGETS[name],
                         "yes" if t <= TARGETS[name] else "NO", ", ".join(heavy) or "-"])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"median of {repeats} fresh processes; python -c pass: {base:.3f} s")
    print(table(["command", "s", "x python", "target s", "met", "imports"], rows))
    if not args.smoke:
        print(f"written: {res.write(repeats=repeats, figures=figures)}")


if __name__ == "__main__":
    main()
