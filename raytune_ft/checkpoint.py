"""Trial checkpoints: one folder with the training state and the resolved config.

`state.pt` holds only tensors and plain containers, so it loads with
``torch.load(weights_only=True)``: a checkpoint can never run code when read back.

Every file rtft writes atomically (a temporary name, then a rename) gets the mode a plain
`open()` would give it, 0666 less the umask (:func:`file_mode`): some writers create theirs
0600 (safetensors, `tempfile.mkstemp`), which on shared storage keeps a teammate from reading
a model whose other files they can read. torch is imported only by the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from raytune_ft.errors import first_line

__all__ = ["CheckpointError", "file_mode", "file_sha256", "honour_umask", "load_checkpoint",
           "save_checkpoint", "umask", "write_atomic"]

STATE = "state.pt"
CONFIG = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, truncated or not ours."""


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask now. Read from /proc/self/status where Linux shows it (4.7+), which
    changes nothing; elsewhere set and restored at once under a lock (the only portable way to
    read it; a file another thread creates in between gets 0o077 at worst, never wider)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the umask (0o644 under umask 022,
    0o664 under 002)."""
    return 0o666 & ~umask()


def honour_umask(*paths: str | Path) -> None:
    """Give each file of `paths` :func:`file_mode`, whatever mode its writer chose."""
    mode = file_mode()
    for p in paths:
        os.chmod(p, mode)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` under a temporary name beside it, give it the umask's mode,
    then rename it into place: a reader (or a crash) sees the old file or the new one, never
    half of one. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    file or the new one, never half of one; each gets the umask's mode (:func:`file_mode`).
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"model": model, "epoch": epoch, "best": best}
    if optimizer is not None and scheduler is not None:
        state["optimizer"], state["scheduler"] = optimizer, scheduler
    if best_model is not None and best_epoch is not None and best_epoch != epoch:
        state["best_model"], state["best_epoch"] = best_model, best_epoch
    tmp = folder / (STATE + ".tmp")
    torch.save(state, tmp)
    honour_umask(tmp)  # torch's open() gives it today; stated, not left to torch
    os.replace(tmp, folder / STATE)
    write_atomic(folder / CONFIG, json.dumps(config, indent=1, sort_keys=True))
    return folder


def load_checkpoint(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint folder: (state, config). Raises :class:`CheckpointError`."""
    import torch

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


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks: what promotion records of a
    model's weights, and what loading it, distillation and the dry run check."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
