"""Promotion: choose the best trial honestly, score it once on the held-out test split, and
write a versioned model folder atomically (temp folder, then rename).

How the best trial is chosen: only trials that trained as far as any trial got (the highest
rung reached) are eligible, ranked by their best-so-far value of the metric — never by their
last value, and never letting a trial stopped after one epoch beat full-length runs on a lucky
early score. Diverged and failed trials are never promoted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from raytune_ft.checkpoint import load_checkpoint
from raytune_ft.data import Splits
from raytune_ft.knobs import Hyperparams
from raytune_ft.models import build_model, input_stats
from raytune_ft.runs import (  # re-exported: promotion's rule lives with the records
    TrialRecord,
    choose,
    fmt,
    ranked,
    text_table,
    trial_state,
    trial_table,
)
from raytune_ft.spec import ModelSpec, Spec
from raytune_ft.train import evaluate

__all__ = ["PromotedModel", "TrialRecord", "choose", "fmt", "load_promoted", "promote",
           "ranked", "text_table", "trial_state", "trial_table"]


def _rebuild(config: dict[str, Any]) -> nn.Module:
    hp = Hyperparams(**config["hparams"])
    model = ModelSpec.model_validate(config["spec"]["model"])
    return build_model(model, len(config["classes"]), hp, "none").model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _latency_ms(model: nn.Module, image_size: int, repeats: int = 20) -> float:
    """Median CPU time of one forward pass at batch 1 (after 3 warm-up passes), in ms."""
    x = torch.rand(1, 3, image_size, image_size)
    model = model.cpu().eval()
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _teacher_section(spec: Spec, metrics: dict, n_params: int, model: nn.Module) -> str:
    """The student beside its teacher (`model.teacher`): held-out accuracy, size, and CPU
    latency at batch 1, both measured here on this machine, one after the other."""
    if spec.model.teacher is None:
        return ""
    t = Path(spec.model.teacher).expanduser()
    size = spec.data.image_size
    s_ms = f"{_latency_ms(model, size):.2f}"
    try:
        t_acc = f"{json.loads((t / 'metrics.json').read_text())['test']['acc']:.4f}"
        t_params = f"{_n_params(t / 'model.safetensors'):,}"
        t_ms = f"{_latency_ms(load_promoted(t).model, size):.2f}"
    except (OSError, ValueError, KeyError, PromotedModelError):  # moved since the search
        t_acc = t_params = t_ms = "(teacher folder unreadable)"
    return f"""
## Distilled from `{spec.model.teacher}`

| model | test accuracy | parameters (values in model.safetensors) | CPU latency, batch 1 |
|---|---|---|---|
| student (this model) | {metrics['test']['acc']:.4f} | {n_params:,} | {s_ms} ms |
| teacher | {t_acc} | {t_params} | {t_ms} ms |

The teacher's accuracy is on its own held-out test split (the same one when both used the
same data and split settings). Latency: median of 20 forward passes on a random
{size} px image, PyTorch on this machine's CPU, at promotion.
"""


def _card(spec: Spec, rec: TrialRecord, metrics: dict, params: dict, n_params: int,
          model: nn.Module) -> str:
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


def promote(spec: Spec, records: list[TrialRecord], splits: Splits, *,
            echo: Callable[[str], None] = print) -> list[Path]:
    """Promote the `spec.promote.top_k` best trials; returns the new model folders."""
    chosen = choose(records, spec.metric, spec.promote.top_k)
    if not chosen:
        echo("nothing to promote: no trial finished an epoch with a checkpoint")
        return []
    root = Path(spec.promote.dir).expanduser().resolve() / spec.name
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root)
    out = []
    for rank, rec in enumerate(chosen, 1):
        state, config = load_checkpoint(rec.best_checkpoint)
        model = _rebuild(config)
        # The best epoch's weights, which the trainer keeps beside its latest training state
        # (older checkpoints, one per epoch, hold only the latter: the best epoch's own).
        model.load_state_dict(state.get("best_model", state["model"]))
        mean, std = input_stats(spec.model)
        test_loss, test_acc = evaluate(model, splits.test_x, splits.test_y, mean=mean, std=std)
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
            fixed = spec.model_dump(mode="json")
            fixed["search"] = {k: {"space": "fixed", "value": v} for k, v in params.items()}
            fixed["run"]["num_samples"] = 1
            (tmp / "spec.yaml").write_text(yaml.safe_dump(fixed, sort_keys=False))
            (tmp / "config.json").write_text(json.dumps(
                {**config, "mean": mean, "std": std}, indent=1))
            metrics = {
                "trial_id": rec.trial_id, "rank": rank, "epochs": rec.epochs,
                "metric": spec.metric, "params": params,
                "val": {"epoch": epoch, "val_acc": best_epoch.get("val_acc"),
                        "val_loss": best_epoch.get("val_loss"),
                        f"best_{spec.metric}": rec.best(spec.metric)},
                "test": {"acc": test_acc, "loss": test_loss, "n": len(splits.test_y)},
                "data": splits.fingerprint,
                "sha256": _sha256(tmp / "model.safetensors"),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            while True:  # another promotion may have taken the number: take the next one
                dest = root / f"v{_next_version(root)}"
                metrics["path"] = str(dest)
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
                n_values = sum(v.numel() for v in model.state_dict().values())
                (tmp / "MODEL_CARD.md").write_text(_card(spec, rec, metrics, params, n_values,
                                                           model))
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
        echo(f"promoted trial {rec.trial_id} (rank {rank}): val {spec.metric} "
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
    if verify and _sha256(weights) != metrics.get("sha256"):
        raise PromotedModelError(f"{weights}: sha256 does not match metrics.json; the file is "
                                 f"corrupted or was replaced")
    model = _rebuild(config)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return PromotedModel(model, config, metrics)
