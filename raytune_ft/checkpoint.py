"""Trial checkpoints: one folder with the training state and the resolved config.

`state.pt` holds only tensors and plain containers, so it loads with
``torch.load(weights_only=True)``: a checkpoint can never run code when read back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from raytune_ft.errors import first_line

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

STATE = "state.pt"
CONFIG = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, truncated or not ours."""


def save_checkpoint(folder: str | Path, *, model: dict, optimizer: dict | None,
                    scheduler: dict | None, epoch: int, best: float | None,
                    config: dict[str, Any],
                    best_model: dict | None = None, best_epoch: int | None = None) -> Path:
    """Write `state.pt` and `config.json` into `folder` (created); returns the folder.

    `model`, `optimizer`, `scheduler` and `epoch` are the latest training state (what a
    resumed trial continues from); `best_model` and `best_epoch`, the weights of the best
    epoch so far (what promotion takes), when they are not the latest epoch's. A trial's
    final checkpoint, which no trial continues from, leaves out the optimizer and scheduler
    (None): for resnet18 with Adam, 45 MB instead of 128.

    Each file is written under a temporary name and renamed, so a crash leaves the previous
    file or the new one, never half of one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"model": model, "epoch": epoch, "best": best}
    if optimizer is not None and scheduler is not None:
        state["optimizer"], state["scheduler"] = optimizer, scheduler
    if best_model is not None and best_epoch is not None and best_epoch != epoch:
        state["best_model"], state["best_epoch"] = best_model, best_epoch
    tmp = folder / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE)
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(tmp, folder / CONFIG)
    return folder


def load_checkpoint(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint folder: (state, config). Raises :class:`CheckpointError`."""
    folder = Path(folder)
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {folder} is incomplete: {e.filename} missing") from e
    except Exception as e:  # truncated zip, refused pickle, bad JSON
        # First line only: torch's refusal of a pickle runs to a page of advice.
        raise CheckpointError(f"checkpoint {folder} cannot be read ({type(e).__name__}: "
                              f"{first_line(e)})") from e
    if not {"model", "epoch"} <= set(state):
        raise CheckpointError(f"checkpoint {folder} is not an rtft checkpoint")
    return state, config
