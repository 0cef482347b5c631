"""Checkpoints (checkpoint.py): a truncated or malicious checkpoint is refused with one clear
line, and nothing in it runs (a weights file is refused the same way: models.load_state_file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raytune_ft.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from raytune_ft.errors import SpecError


# --------------------------------------------------------------------------------------------
# Nothing unsafe is loaded: a pickle that would run code.
# --------------------------------------------------------------------------------------------
class _Payload:
    marker = ""

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _evil_file(path: Path, marker: Path) -> Path:
    _Payload.marker = str(marker)
    torch.save({"model": _Payload(), "optimizer": {}, "epoch": 1}, path)
    return path


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = _evil_file(tmp_path / "evil.pth", marker)
    # The payload is live: an unsafe load would run it (the control).
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    from raytune_ft.model.build import load_state_file

    with pytest.raises(SpecError, match="cannot be loaded as plain tensors") as info:
        load_state_file(evil)  # model.weights
    assert info.value.field == "model.weights"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _evil_file(ckpt / "state.pt", marker)
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"cannot be read \(UnpicklingError: Weights only"):
        load_checkpoint(ckpt)  # a resume checkpoint
    assert not marker.exists()


def test_truncated_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "c", model={"w": torch.ones(64, 64)}, optimizer={},
                             scheduler={}, epoch=1, best=0.5, config={"a": 1})
    state = folder / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        load_checkpoint(folder)
    assert "\n" not in str(info.value)


def test_a_final_checkpoint_holds_weights_only(tmp_path: Path) -> None:
    w = {"w": torch.ones(4, 4)}
    folder = save_checkpoint(tmp_path / "c", model=w, optimizer=None, scheduler=None, epoch=3,
                             best=0.5, config={}, best_model={"w": torch.zeros(4, 4)},
                             best_epoch=2)
    state, _ = load_checkpoint(folder)
    assert "optimizer" not in state and "scheduler" not in state
    assert state["best_epoch"] == 2 and torch.equal(state["best_model"]["w"], torch.zeros(4, 4))
    folder = save_checkpoint(tmp_path / "d", model=w, optimizer={}, scheduler={}, epoch=3,
                             best=0.5, config={}, best_model=w, best_epoch=3)
    state, _ = load_checkpoint(folder)
    assert "best_model" not in state  # the best epoch is the latest: stored once


# --------------------------------------------------------------------------------------------
# Shared storage: every file gets the umask's mode, whoever wrote it.
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request: pytest.FixtureRequest):  # noqa: ANN201
    """The process's umask set to the parameter for the test, restored after it."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_checkpoint_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    from raytune_ft.checkpoint import file_mode, write_atomic
    from raytune_ft.checkpoint import umask as read_umask

    assert read_umask() == umask and file_mode() == 0o666 & ~umask
    expected = {0o022: 0o644, 0o002: 0o664}[umask]
    folder = save_checkpoint(tmp_path / "c", model={"w": torch.ones(2)}, optimizer={},
                             scheduler={}, epoch=1, best=0.5, config={"a": 1})
    # Saved twice: replacing a file keeps the mode too (the temporary file is new each time).
    save_checkpoint(folder, model={"w": torch.ones(2)}, optimizer={}, scheduler={}, epoch=2,
                    best=0.5, config={"a": 2})
    run_file = write_atomic(tmp_path / "environment.json", "{}")
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*folder.iterdir(), run_file]}
    assert modes == {"state.pt": expected, "config.json": expected,
                     "environment.json": expected}, {k: oct(v) for k, v in modes.items()}


def test_a_file_another_writer_made_0600_gets_the_umasks_mode(tmp_path: Path,
                                                              umask: int) -> None:
    """What safetensors does (it writes its file 0600): honour_umask widens it to the mode the
    model folder's other files have."""
    from raytune_ft.checkpoint import honour_umask

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    f.chmod(0o600)
    honour_umask(f)
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_umask_is_read_without_proc_too(umask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc/self/status (macOS, old kernels) it is set and restored at once."""
    from raytune_ft import checkpoint

    def no_proc(*args: object, **kw: object) -> None:
        raise OSError("no /proc here")

    monkeypatch.setattr(checkpoint, "open", no_proc, raising=False)
    assert checkpoint.umask() == umask
    assert os.umask(umask) == umask  # left as it was
