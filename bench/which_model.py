"""Which model: one search over the architecture against one search per architecture.

The same task, space, searcher and ASHA, at the same budget of trials (and so the same nominal
epoch budget): (a) `search_spaces/which_model.yaml` as shipped, `model.arch` a choice and
`num_samples` N; (b) one search per architecture (`Spec.for_arch`: the same space with the
architecture fixed), N / len(archs) trials each. Each search runs as a user runs it, `rtft search`
in a fresh process, one at a time, and promotes its best trial (held-out test accuracy once).
For (b) the user's answer is the promoted model of the search whose best val_acc is highest.

Reported per arm and searcher seed: the best val_acc reached, the held-out test accuracy of
what was promoted (and its architecture), the compute spent (epochs trained, trial seconds:
the sum of every epoch's `epoch_s`; wall seconds of the searches, pretraining excluded: the
backbones are built before the first arm) and the trials each architecture got.

    python bench/which_model.py                      # seeds 0 and 1, ~15 minutes on 2 CPUs
    python bench/which_model.py --seeds 0 1 2 --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SMOKE_OVERRIDES, Results, load_average, out_dir_arg, table  # noqa: E402

SPEC = ROOT / "search_spaces" / "which_model.yaml"


def _spec(path: Path, overrides: list[str]) -> Any:
    from raytune_ft.spec.yaml_io import load_spec

    return load_spec(path, overrides)


def _write(spec: Any, folder: Path, name: str, samples: int, seed: int) -> Path:
    """`spec` renamed, with `samples` trials, the searcher seed, run and model folders here."""
    from raytune_ft.spec.yaml_io import spec_to_yaml

    spec = spec.model_copy(update={
        "name": name,
        "searcher": spec.searcher.model_copy(update={"seed": seed}),
        "run": spec.run.model_copy(update={"num_samples": samples,
                                           "storage_path": str(folder / "runs")}),
        "promote": spec.promote.model_copy(update={"dir": str(folder / "models")})})
    path = folder / f"{name}.yaml"
    path.write_text(spec_to_yaml(spec))
    return path


def _search(spec_file: Path, folder: Path) -> dict[str, Any]:
    """`rtft search` in a fresh process; what its run folder and promoted model say."""
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raytune_ft.cli", "search", str(spec_file),
                           "--quiet"], cwd=folder, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rtft search {spec_file} failed:\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-3000:]}")
    name = spec_file.stem
    trials = json.loads((folder / "runs" / name / "trials.json").read_text())
    metrics = json.loads((folder / "models" / name / "v1" / "metrics.json").read_text())
    by_arch: dict[str, int] = {}
    for t in trials:
        arch = t["params"].get("arch") or metrics["arch"]
        by_arch[arch] = by_arch.get(arch, 0) + 1
    hist = [h for t in trials for h in t["history"]]
    return {"wall_s": round(wall, 1), "trials": len(trials), "trials_by_arch": by_arch,
            "epochs": len(hist), "trial_s": round(sum(h.get("epoch_s", 0.0) for h in hist), 1),
            "best_val_acc": max(h["val_acc"] for h in hist),
            "promoted_arch": metrics["arch"],
            "promoted_val": metrics["val"][f"best_{metrics['metric']}"],
            "test_acc": metrics["test"]["acc"]}


def _ensure_backbones(spec: Any) -> None:
    """Build every architecture's rtft: backbone before the first arm (not in its time)."""
    from raytune_ft.model.pretrain import ensure_backbone

    ensure_backbone(spec, echo=lambda s: print(s, flush=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=SPEC)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--smoke", action="store_true", help="tiny task, 2 trials per arm, seed 0")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    overrides = [*SMOKE_OVERRIDES, "run.num_samples=2"] if args.smoke else []
    seeds = [0] if args.smoke else args.seeds
    res = Results("which_model", smoke=args.smoke, out_dir=out_dir_arg(args.out))
    spec = _spec(args.spec, overrides)
    archs, n = spec.archs, spec.run.num_samples
    if not spec.arch_searched or n % len(archs):
        raise SystemExit(f"{args.spec}: needs a model.arch choice and num_samples divisible by "
                         f"its {len(archs)} architectures")
    _ensure_backbones(spec)
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="rtft-which-") as tmp:
            folder = Path(tmp)
            print(f"seed {seed}: (a) one search over {', '.join(archs)}, {n} trials "
                  f"(load {load_average()[0]})", flush=True)
            a = _search(_write(spec, folder, "choice", n, seed), folder)
            per = {}
            for arch in archs:
                print(f"seed {seed}: (b) {arch} alone, {n // len(archs)} trials "
                      f"(load {load_average()[0]})", flush=True)
                per[arch] = _search(_write(spec.for_arch(arch), folder, f"only-{arch}",
                                           n // len(archs), seed), folder)
        best = max(per.values(), key=lambda r: r["promoted_val"])
        b = {"wall_s": round(sum(r["wall_s"] for r in per.values()), 1),
             "trials": sum(r["trials"] for r in per.values()),
             "trials_by_arch": {k: r["trials"] for k, r in per.items()},
             "epochs": sum(r["epochs"] for r in per.values()),
             "trial_s": round(sum(r["trial_s"] for r in per.values()), 1),
             "best_val_acc": max(r["best_val_acc"] for r in per.values()),
             "promoted_arch": best["promoted_arch"], "promoted_val": best["promoted_val"],
             "test_acc": best["test_acc"], "per_arch": per}
        runs.append({"seed": seed, "choice": a, "separate": b})
    head = ["seed", "arm", "best val_acc", "promoted", "test acc", "epochs", "trial s", "wall s",
            "trials per arch"]
    rows = []
    for r in runs:
        for arm, label in (("choice", "(a) arch choice"), ("separate", "(b) one per arch")):
            x = r[arm]
            rows.append([r["seed"], label, x["best_val_acc"], x["promoted_arch"], x["test_acc"],
                         x["epochs"], x["trial_s"], x["wall_s"],
                         " ".join(f"{k}:{v}" for k, v in x["trials_by_arch"].items())])
    text = table(head, rows)
    print(text)

    def mean(arm: str, key: str) -> float:
        return sum(r[arm][key] for r in runs) / len(runs)

    ratios = {k: round(mean("choice", k) / mean("separate", k), 3)
              for k in ("epochs", "trial_s", "wall_s")}
    summary = {arm: {k: round(mean(arm, k), 4) for k in
                     ("best_val_acc", "test_acc", "epochs", "trial_s", "wall_s")}
               for arm in ("choice", "separate")}
    print(f"(a)/(b) compute: epochs {ratios['epochs']}, trial seconds {ratios['trial_s']}, "
          f"wall {ratios['wall_s']}; mean best val_acc {summary['choice']['best_val_acc']} vs "
          f"{summary['separate']['best_val_acc']}, test acc {summary['choice']['test_acc']} vs "
          f"{summary['separate']['test_acc']}")
    path = res.write(spec=str(args.spec), archs=archs, num_samples=n, seeds=seeds, runs=runs,
                     summary=summary, ratios=ratios, table=text)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
