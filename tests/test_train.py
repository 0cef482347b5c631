"""The trainer alone (no Ray): metrics, checkpoints, exact resume, divergence, unfreezing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

from raytune_ft.checkpoint import CheckpointError, load_checkpoint
from raytune_ft.data import prepare
from raytune_ft.spec import Hyperparams
from raytune_ft.train import DIVERGED, evaluate, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    spec = tiny_spec(tmp_path_factory.mktemp("train"))
    return spec, prepare(spec.data)


def _keep(store: list, root: Path):  # noqa: ANN202
    """A report that copies each checkpoint (the folder is only valid during the call)."""
    import shutil

    def report(metrics: dict, folder: Path | None) -> None:
        dest = None
        if folder is not None:
            dest = root / f"epoch{metrics['epoch']}"
            shutil.copytree(folder, dest)
        store.append((metrics, dest))
    return report


def test_reports_every_epoch_with_a_checkpoint(setup, tmp_path: Path, hp: Hyperparams) -> None:  # noqa: ANN001
    spec, data = setup
    got: list = []
    result = train(hp, spec=spec, data=data, report=_keep(got, tmp_path))
    assert [m["epoch"] for m, _ in got] == [1, 2]
    m, ckpt = got[-1]
    assert {"train_loss", "val_loss", "val_acc", "best_val_acc", "lr", "images_per_s"} <= set(m)
    assert m["best_val_acc"] == max(x["val_acc"] for x, _ in got)
    state, config = load_checkpoint(ckpt)
    assert state["epoch"] == 2 and config["hparams"]["batch_size"] == 32
    assert config["spec"]["name"] == "tiny" and config["classes"][0] == "0"
    assert evaluate(result.model, data.val_x, data.val_y)[1] == pytest.approx(m["val_acc"])


def test_resume_continues_exactly(setup, tmp_path: Path, hp: Hyperparams) -> None:  # noqa: ANN001
    spec, data = setup
    full: list = []
    train(hp, spec=spec, data=data, report=_keep(full, tmp_path / "a"))
    resumed: list = []
    train(hp, spec=spec, data=data, report=_keep(resumed, tmp_path / "b"),
          resume_from=full[0][1])
    assert [m["epoch"] for m, _ in resumed] == [2]
    assert resumed[0][0]["val_acc"] == pytest.approx(full[1][0]["val_acc"], abs=1e-6)
    assert resumed[0][0]["train_loss"] == pytest.approx(full[1][0]["train_loss"], rel=1e-5)


def test_divergence_stops_at_once_with_worst_metric(setup) -> None:  # noqa: ANN001
    spec, data = setup
    got: list = []
    result = train(Hyperparams(lr=10.0, optimizer="sgd", momentum=0.99, batch_size=32,
                               augment="none", backbone_lr_mult=100),
                   spec=spec, data=data, report=lambda m, c: got.append((m, c)))
    assert result.diverged and len(got) == 1
    m, ckpt = got[0]
    assert m["diverged"] and m["val_acc"] == DIVERGED["val_acc"] and ckpt is None


def test_frozen_backbone_trains_only_the_head_until_unfrozen(setup) -> None:  # noqa: ANN001
    spec, data = setup
    hp = Hyperparams(freeze_depth=5, unfreeze_at_epoch=2, batch_size=32, augment="none")
    from raytune_ft.models import build_model

    torch.manual_seed(spec.train.seed)  # the trainer's first act: same init as `start`
    start = build_model("resnet18", 10, hp).model.state_dict()
    snapshots: list = []

    def report(m: dict, folder: Path | None) -> None:
        snapshots.append(load_checkpoint(folder)[0]["model"])

    train(hp, spec=spec, data=data, report=report)
    after1, after2 = snapshots
    assert torch.equal(after1["conv1.weight"], start["conv1.weight"])
    assert torch.equal(after1["layer1.0.bn1.running_mean"], start["layer1.0.bn1.running_mean"])
    assert not torch.equal(after1["fc.1.weight"], start["fc.1.weight"])
    assert not torch.equal(after2["conv1.weight"], after1["conv1.weight"])


def test_truncated_checkpoint_is_a_clear_error(setup, tmp_path: Path, hp: Hyperparams) -> None:  # noqa: ANN001
    spec, data = setup
    got: list = []
    train(hp, spec=spec.model_copy(update={"train": spec.train.model_copy(
        update={"max_epochs": 1})}), data=data, report=_keep(got, tmp_path))
    state_file = got[0][1] / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(got[0][1])
