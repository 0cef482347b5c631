"""Promotion: choose the best trial honestly, score it once on the held-out test split, and
write a versioned model folder atomically (temp folder, then rename).

How the best trial is chosen: only trials that trained as far as any trial got (the highest
rung reached) are eligible, ranked by their best-so-far value of the metric — never by their
last value, and never letting a trial stopped after one epoch beat full-length runs on a lucky
early score. Diverged and failed trials are never promoted. Cost bounds
(`promote.max_latency_ms`, `promote.max_params`) choose among the trials that fit;
`pareto=True` promotes every point of the accuracy / latency front instead
(:func:`raytune_ft.runs.choose_for`). A trial of an architecture search is promoted with its own
single-architecture spec (`Spec.for_trial`): its model folder reads like any other.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from raytune_ft.checkpoint import file_sha256, honour_umask, load_checkpoint
from raytune_ft.data import Splits, prepare
from raytune_ft.environment import summary as environment_summary
from raytune_ft.knobs import Hyperparams
from raytune_ft.model.build import build_model, input_stats
from raytune_ft.model.cost import measure
from raytune_ft.runs import TrialRecord
from raytune_ft.selection import choose_for
from raytune_ft.spec.schema import ModelSpec, Spec
from raytune_ft.train import evaluate

__all__ = ["PromotedModel", "PromotedModelError", "load_promoted", "promote"]


def _rebuild(config: dict[str, Any]) -> nn.Module:
    hp = Hyperparams(**config["hparams"])
    model = ModelSpec.model_validate(config["spec"]["model"])
    return build_model(model, len(config["classes"]), hp, "none").model


def _clean_stale_tmp(root: Path) -> None:
    """Remove temporary folders left by promotions on this host whose process is gone (killed
    mid-way); they were never renamed into place, so nothing refers to them."""
    for p in root.glob(".tmp-*"):
        m = re.fullmatch(r"\.tmp-(.+)-(\d+)-[0-9a-f]+", p.name)
        if not m or m.group(1) != socket.gethostname():
            continue  # another host's (shared storage) or an older name: not ours to judge
        try:
            os.kill(int(m.group(2)), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _next_version(root: Path) -> int:
    nums = [int(m.group(1)) for p in root.glob("v*") if (m := re.fullmatch(r"v(\d+)", p.name))]
    return max(nums, default=0) + 1


def _n_params(weights: Path) -> int:
    """Number of values in a safetensors file, read from its header (no tensor loaded)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape())
                   for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)


def _cpu_latency_ms(model: nn.Module, image_size: int) -> float:
    """Latency at batch 1 on this machine's CPU, measured as every trial measures its own
    (:func:`raytune_ft.model.cost.measure`), here and now, for the student and its teacher alike."""
    return measure(model.cpu(), image_size, cache=False).latency_b1_ms


def _side_by_side_ms(models: list[nn.Module], image_size: int, threads: int) -> list[float]:
    """Each model's CPU latency at batch 1 with `threads` torch threads (a trial's), measured
    in turn twice and the lower kept: the first model measured is not the one that pays for a
    machine still busy with the search's end."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [[_cpu_latency_ms(m, image_size) for m in models] for _ in range(2)]
    finally:
        torch.set_num_threads(before)
    return [min(r[i] for r in runs) for i in range(len(models))]


def _teacher_section(spec: Spec, metrics: dict, n_params: int, model: nn.Module) -> str:
    """The student beside its teacher (`model.teacher`): which teacher (path, version, weights
    sha256), the distillation knobs of the promoted trial, and held-out accuracy, size and CPU
    latency at batch 1 of both, measured here on this machine, one after the other."""
    if spec.model.teacher is None:
        return ""
    t = Path(spec.model.teacher).expanduser()
    size = spec.data.image_size
    threads = max(1, int(spec.run.resources.cpu))  # as a trial measures (search/trainable.py)
    try:
        teacher = load_promoted(t)  # checks its weights against its metrics.json's sha256
        t_acc = f"{teacher.metrics['test']['acc']:.4f}"
        t_params = f"{_n_params(t / 'model.safetensors'):,}"
        s_ms, t_ms = (f"{v:.2f}" for v in _side_by_side_ms([model, teacher.model], size,
                                                           threads))
        t_sha = f"`{teacher.metrics['sha256']}`"
        t_arch = teacher.metrics.get("arch") or teacher.config["spec"]["model"]["arch"]
    except (OSError, ValueError, KeyError, PromotedModelError):  # moved since the search
        t_acc = t_params = t_ms = t_sha = t_arch = "(teacher folder unreadable)"
        s_ms = f"{_side_by_side_ms([model], size, threads)[0]:.2f}"
    hp = Hyperparams(**{k: v for k, v in metrics.get("params", {}).items()
                        if k in Hyperparams.model_fields})
    how = "searched" if "distill_alpha" in spec.search and \
        spec.search["distill_alpha"].space != "fixed" else "fixed"
    return f"""
## Distilled from `{spec.model.teacher}`

| teacher | |
|---|---|
| path | `{spec.model.teacher}` (resolved: `{t.resolve()}`) |
| model, version | {t.parent.name}, {t.name} ({t_arch}) |
| weights sha256 | {t_sha} |
| held-out test accuracy | {t_acc} |
| distill_alpha (this trial; {how}) | {hp.distill_alpha:g} |
| distill_temperature (this trial) | {hp.distill_temperature:g} |

Loss: (1 - distill_alpha) × the task loss + distill_alpha × T² × KL(teacher ‖ student) at
temperature T, against the teacher's logits on the unaugmented training images, computed once
before the trials. `rtft reproduce` of this trial checks the teacher's sha256 against the one
its run recorded (`teacher.json`).

| model | test accuracy | parameters (values in model.safetensors) | CPU latency, batch 1 |
|---|---|---|---|
| student (this model) | {metrics['test']['acc']:.4f} | {n_params:,} | {s_ms} ms |
| teacher | {t_acc} | {t_params} | {t_ms} ms |

The teacher's accuracy is on its own held-out test split (the same one when both used the
same data and split settings). Latency: median forward time at batch 1 on a {size} px input
(as every trial measures it), PyTorch on this machine's CPU with {threads} thread(s), both at
promotion, each measured twice in turn and the lower kept.
"""


def _trial_device(spec: Spec) -> str:
    """The device the trial trained on, as its spec says (train.device, run.resources.gpu)."""
    gpu = spec.train.device == "cuda" or (spec.train.device == "auto"
                                          and spec.run.resources.gpu > 0)
    return "GPU" if gpu else "CPU"


def _cost_section(spec: Spec, rec: TrialRecord) -> str:
    """What the model costs, as the trainer measured it in the trial (none for a trial of an
    rtft before costs were recorded)."""
    c, arch = rec.cost, spec.model.arch
    if not c:
        return f"\n## Cost\n{arch}; no cost recorded (the trial ran on an rtft before costs).\n"

    def get(key: str, f: Callable[[float], str]) -> str:
        return f(c[key]) if key in c else "not measured"

    flops = get("flops", lambda v: f"{v / 1e9:.3g} GFLOPs" if v >= 1e9 else f"{v / 1e6:.3g} MFLOPs")

    def ms(v: float) -> str:
        return f"{v:.3g} ms"

    size, dev = spec.data.image_size, _trial_device(spec)
    return f"""
## Cost (measured in trial {rec.trial_id}, on its {dev})

| | |
|---|---|
| architecture | {arch} |
| parameters | {get('params', lambda v: f'{int(v):,}')} |
| FLOPs per image (forward, {size} px) | {flops} |
| latency, batch 1 | {get('latency_b1_ms', ms)} |
| latency, batch 32 | {get('latency_b32_ms', ms)} |
| seconds per training epoch | {get('epoch_s', lambda v: f'{v:.3g} s')} |

FLOPs as torch.utils.flop_counter counts them. Latency: median forward time in eval mode on
the trial's {dev}, zeros as input, measured once before its first epoch. Seconds per epoch:
training and validation, the mean over its {rec.epochs} epoch(s).
"""


def _environment_section(rec: TrialRecord, env: dict[str, Any] | None) -> str:
    """The environment the trial trained in, as its trainer recorded it in the checkpoint
    (config.json, key `environment`): what `rtft reproduce` must match to expect the same
    bits."""
    if not isinstance(env, dict):
        return ("\n## Environment\nNot recorded (the trial ran on an rtft before environments "
                "were recorded).\n")
    rows = "\n".join(f"| {label} | {value} |" for label, value in environment_summary(env))
    return f"""
## Environment (trial {rec.trial_id}, as its trainer recorded it)

| | |
|---|---|
{rows}

Float results are bit-equal only in the same environment (config.json, key `environment`);
`rtft reproduce` compares exactly there, and within a stated tolerance elsewhere.
"""


def _card(spec: Spec, rec: TrialRecord, metrics: dict, params: dict, n_params: int,
          model: nn.Module, env: dict[str, Any] | None = None) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
    val, test, size = metrics["val"], metrics["test"], spec.data.image_size
    val_row = f"{val['val_acc']:.4f} | {val['val_loss']:.4f} | {metrics['data']['val']}"
    test_row = f"**{test['acc']:.4f}** | {test['loss']:.4f} | {test['n']}"
    return f"""# {spec.name} — {spec.model.arch}, promoted from trial {rec.trial_id}

Fine-tuned from `{spec.model.weights}` on `{spec.data.source}` by an rtft search
({spec.run.num_samples} trials, {spec.searcher.sampler} sampler, {spec.scheduler.type} scheduler).

| split | accuracy | loss | examples |
|---|---|---|---|
| validation (best epoch, chosen on it) | {val_row} |
| **test (held out, scored once here)** | {test_row} |

Trained {rec.epochs} epoch(s); checkpoint of epoch {metrics['val']['epoch']}.
Data fingerprint: `{metrics['data']['sha256']}`. Weights sha256: `{metrics['sha256']}`.
{_cost_section(spec, rec)}{_environment_section(rec, env)}\
{_teacher_section(spec, metrics, n_params, model)}
## Parameters
| parameter | value |
|---|---|
{rows}

## Use
```python
from raytune_ft import load_promoted
m = load_promoted("{metrics.get('path', '.')}")   # checks the weights' sha256
logits = m.model(images)   # float (N, 3, {size}, {size}), normalised with config.json's mean/std
```
Re-train this exact configuration alone: `rtft search spec.yaml` (every parameter is fixed).
"""


def _splits_for(spec: Spec, splits: Splits | Mapping[int, Splits] | None,
                made: dict[int | None, Splits]) -> Splits:
    """The held-out test images at `spec`'s (one trial's) input size: from `splits` (one
    Splits, or one per image size as `data.prepare_each` gives) when it has that size, else
    prepared once per size (an architecture search's trials may differ)."""
    size = spec.data.image_size
    if isinstance(splits, Mapping):
        if size in splits:
            return splits[size]
    elif splits is not None:
        x = splits.test_x
        if (x.shape[-1] if isinstance(x, torch.Tensor) else x.size) == size:
            return splits
    if size not in made:
        made[size] = prepare(spec.data)
    return made[size]


def promote(spec: Spec, records: list[TrialRecord],
            splits: Splits | Mapping[int, Splits] | None = None, *,
            echo: Callable[[str], None] = print, pareto: bool = False) -> list[Path]:
    """Promote the `spec.promote.top_k` best trials that fit `spec.promote`'s cost bounds,
    or with `pareto` every point of the accuracy / latency front, cheapest first (one version
    each); returns the new model folders.

    `splits`: the data whose test split is scored: one Splits, one per image size (keyed by
    size), or None; a trial whose input size it lacks has its data read for its own spec.
    Raises :class:`~raytune_ft.errors.UserError` when no trial fits the bounds."""
    chosen = choose_for(spec, records, pareto=pareto)
    if not chosen:
        echo("nothing to promote: no trial finished an epoch with a checkpoint")
        return []
    root = Path(spec.promote.dir).expanduser().resolve() / spec.name
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root)
    out: list[Path] = []
    made: dict[int | None, Splits] = {}
    for rank, rec in enumerate(chosen, 1):
        # The trial's own spec: one architecture, its weights and input size (for_trial).
        tspec = spec.for_trial(rec.params)
        data = _splits_for(tspec, splits, made)
        state, config = load_checkpoint(rec.best_checkpoint)
        model = _rebuild(config)
        # The best epoch's weights, which the trainer keeps beside its latest training state
        # (older checkpoints, one per epoch, hold only the latter: the best epoch's own).
        model.load_state_dict(state.get("best_model", state["model"]))
        mean, std = input_stats(tspec.model)
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, mean=mean, std=std)
        epoch = state.get("best_epoch", state["epoch"])
        best_epoch = next((h for h in rec.history if h.get("epoch") == epoch), {})
        params = {**rec.params}
        # Named by host and pid, so a later promotion can tell an abandoned one from a live one.
        tmp = root / f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(tmp / "model.safetensors"))
            # The promoted spec fixes every parameter to the chosen value: rerunnable alone.
            # The architecture is the trial's own spec's model.arch, not a search parameter.
            fixed = tspec.model_dump(mode="json")
            fixed["search"] = {k: {"space": "fixed", "value": v} for k, v in params.items()
                               if k != "arch"}
            fixed["run"]["num_samples"] = 1
            (tmp / "spec.yaml").write_text(yaml.safe_dump(fixed, sort_keys=False))
            (tmp / "config.json").write_text(json.dumps(
                {**config, "mean": mean, "std": std}, indent=1))
            metrics = {
                "trial_id": rec.trial_id, "rank": rank, "epochs": rec.epochs,
                "metric": spec.metric, "params": params, "arch": tspec.model.arch,
                "cost": rec.cost, "pareto": pareto,
                "val": {"epoch": epoch, "val_acc": best_epoch.get("val_acc"),
                        "val_loss": best_epoch.get("val_loss"),
                        f"best_{spec.metric}": rec.best(spec.metric)},
                "test": {"acc": test_acc, "loss": test_loss, "n": len(data.test_y)},
                "data": data.fingerprint,
                "sha256": file_sha256(tmp / "model.safetensors"),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            while True:  # another promotion may have taken the number: take the next one
                dest = root / f"v{_next_version(root)}"
                metrics["path"] = str(dest)
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
                n_values = sum(v.numel() for v in model.state_dict().values())
                (tmp / "MODEL_CARD.md").write_text(_card(tspec, rec, metrics, params, n_values,
                                                           model, config.get("environment")))
                # One mode for every file, the umask's: safetensors writes its file 0600, which
                # on shared storage hides the weights from a teammate who can read the rest.
                honour_umask(*(f for f in tmp.iterdir() if f.is_file()))
                try:
                    os.rename(tmp, dest)  # atomic: the folder appears whole or not at all
                    break
                except OSError:
                    if not dest.exists():
                        raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        latest = root / f".LATEST-{os.getpid()}"
        latest.write_text(dest.name + "\n")
        os.replace(latest, root / "LATEST")  # a reader sees the old name or the new one
        where = (f"Pareto point {rank}/{len(chosen)}, latency_b1_ms "
                 f"{rec.cost['latency_b1_ms']:.3g}" if pareto else f"rank {rank}")
        echo(f"promoted trial {rec.trial_id} ({tspec.model.arch}, {where}): val {spec.metric} "
             f"{rec.best(spec.metric):.4f}, held-out test acc {test_acc:.4f} → {dest}")
        out.append(dest)
    return out


@dataclass
class PromotedModel:
    model: nn.Module
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]


class PromotedModelError(ValueError):
    """A promoted model folder that is incomplete or whose weights do not match their hash."""


def load_promoted(path: str | Path, *, verify: bool = True) -> PromotedModel:
    """Load a promoted model folder (eval mode, CPU); checks the weights' sha256."""
    from safetensors.torch import load_file

    p = Path(path)
    try:
        config = json.loads((p / "config.json").read_text())
        metrics = json.loads((p / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise PromotedModelError(f"{p} is not a promoted rtft model: {e}") from e
    weights = p / "model.safetensors"
    if verify and file_sha256(weights) != metrics.get("sha256"):
        raise PromotedModelError(f"{weights}: sha256 does not match metrics.json; the file is "
                                 f"corrupted or was replaced")
    model = _rebuild(config)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return PromotedModel(model, config, metrics)
