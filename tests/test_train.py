"""The trainer alone (no Ray): metrics, checkpoints, exact resume, divergence, unfreezing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_spec

from raytune_ft.checkpoint import CheckpointError, load_checkpoint
from raytune_ft.data import prepare
from raytune_ft.knobs import Hyperparams
from raytune_ft.model.build import count_params
from raytune_ft.runs import COST_KEYS as COST  # the trainer's keys are the records' keys
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


def _every_epoch(spec):  # noqa: ANN001, ANN202
    """The spec with a checkpoint after every epoch (`run.checkpoint_every: 1`)."""
    return spec.model_copy(update={"run": spec.run.model_copy(update={"checkpoint_every": 1})})


def test_reports_every_epoch_and_checkpoints_the_last(setup, tmp_path: Path,  # noqa: ANN001
                                                      hp: Hyperparams) -> None:
    spec, data = setup
    got: list = []
    result = train(hp, spec=spec, data=data, report=_keep(got, tmp_path))
    assert [m["epoch"] for m, _ in got] == [1, 2]
    assert got[0][1] is None  # by default no checkpoint before the last epoch (max_t)
    m, ckpt = got[-1]
    assert {"train_loss", "val_loss", "val_acc", "best_val_acc", "lr", "images_per_s"} <= set(m)
    # The model's cost on every epoch: measured once, the same each epoch; epoch_s its own.
    for key in COST:
        assert all(x[key] > 0 for x, _ in got), key
    assert got[0][0]["params"] == got[1][0]["params"] == count_params(result.model)
    assert got[0][0]["latency_b1_ms"] == got[1][0]["latency_b1_ms"]
    assert isinstance(m["params"], int) and isinstance(m["flops"], float)
    assert m["best_val_acc"] == max(x["val_acc"] for x, _ in got)
    state, config = load_checkpoint(ckpt)
    assert state["epoch"] == 2 and config["hparams"]["batch_size"] == 32
    assert config["spec"]["name"] == "tiny" and config["classes"][0] == "0"
    assert evaluate(result.model, data.val_x, data.val_y)[1] == pytest.approx(m["val_acc"])


def test_checkpoint_schedule(setup) -> None:  # noqa: ANN001
    from raytune_ft.train import _checkpoint_due

    spec, _ = setup
    def with_run(**run: object):  # noqa: ANN202
        return spec.model_validate({**spec.model_dump(), "train": {"max_epochs": 8},
                                    "scheduler": {"type": "asha", "grace_period": 1,
                                                  "max_t": 6}, "run": run})
    now = __import__("time").monotonic()
    plain = with_run()
    assert [e for e in range(1, 9) if _checkpoint_due(plain, e, now)] == [6, 7, 8]  # max_t on
    every3 = with_run(checkpoint_every=3)
    assert [e for e in range(1, 7) if _checkpoint_due(every3, e, now)] == [3, 6]
    assert _checkpoint_due(plain, 1, now - 601)  # 10 minutes since the last checkpoint


def test_the_last_checkpoint_holds_the_best_epochs_weights(setup, tmp_path: Path,  # noqa: ANN001
                                                            hp: Hyperparams,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Promotion takes the best epoch's weights, which need not be the last epoch's: the
    trainer keeps them in memory and writes them with its next checkpoint."""
    import raytune_ft.train as trainer

    spec, data = setup
    scripted = iter([(0.5, 0.9), (0.9, 0.4)])  # (val_loss, val_acc): epoch 1 is the best
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: next(scripted))
    got: list = []
    train(hp, spec=_every_epoch(spec), data=data, report=_keep(got, tmp_path))
    first, _ = load_checkpoint(got[0][1])
    last, _ = load_checkpoint(got[1][1])
    assert "best_model" not in first  # epoch 1 was the best so far: its own weights
    assert last["epoch"] == 2 and last["best_epoch"] == 1 and last["best"] == 0.9
    for k, v in first["model"].items():
        assert torch.equal(last["best_model"][k], v), k
    # The final checkpoint is weights only: no trial continues from it.
    assert "optimizer" in first and "optimizer" not in last
    again: list = []
    done = train(hp, spec=_every_epoch(spec), data=data, report=_keep(again, tmp_path / "r"),
                 resume_from=got[1][1])  # Ray restarting a trial that had finished
    assert again == [] and torch.equal(done.model.state_dict()["conv1.weight"],
                                       last["model"]["conv1.weight"])


def test_resume_continues_exactly(setup, tmp_path: Path, hp: Hyperparams) -> None:  # noqa: ANN001
    spec, data = setup
    spec = _every_epoch(spec)
    full: list = []
    train(hp, spec=spec, data=data, report=_keep(full, tmp_path / "a"))
    resumed: list = []
    train(hp, spec=spec, data=data, report=_keep(resumed, tmp_path / "b"),
          resume_from=full[0][1])
    assert [m["epoch"] for m, _ in resumed] == [2]
    assert {k: resumed[0][0][k] for k in ("params", "flops")} == \
        {k: full[1][0][k] for k in ("params", "flops")}  # measured on resume too
    assert resumed[0][0]["val_acc"] == pytest.approx(full[1][0]["val_acc"], abs=1e-6)
    assert resumed[0][0]["train_loss"] == pytest.approx(full[1][0]["train_loss"], rel=1e-5)


@pytest.mark.slow  # two trainings, ~4 s (fast-loop headroom)
def test_measuring_the_cost_leaves_training_bit_for_bit_the_same(setup,  # noqa: ANN001
                                                                  hp: Hyperparams) -> None:
    """The first run measures the model's cost (forward passes before epoch 1); the second
    finds it in the process's cache and runs none: the weights they end with are equal."""
    from raytune_ft.model import cost

    spec, data = setup
    hp = hp.model_copy(update={"head_dropout": 0.3, "augment": "light"})  # RNG in training
    cost.clear_cache()
    measured = train(hp, spec=spec, data=data, report=lambda m, c: None, checkpoints=False)
    [entry] = cost._CACHE.values()  # measured once, kept
    cached = train(hp, spec=spec, data=data, report=lambda m, c: None, checkpoints=False)
    [again] = cost._CACHE.values()
    assert again is entry  # the second run found it there (a new measurement is a new Cost)
    a, b = measured.model.state_dict(), cached.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["epoch_s"] > 0 for m in measured.history] == [True, True]


def test_divergence_stops_at_once_with_worst_metric(setup) -> None:  # noqa: ANN001
    spec, data = setup
    got: list = []
    result = train(Hyperparams(lr=10.0, optimizer="sgd", momentum=0.99, batch_size=32,
                               augment="none", backbone_lr_mult=100),
                   spec=spec, data=data, report=lambda m, c: got.append((m, c)))
    assert result.diverged and len(got) == 1
    m, ckpt = got[0]
    assert m["diverged"] and m["val_acc"] == DIVERGED["val_acc"] and ckpt is None
    assert all(k in m for k in COST)


def test_frozen_backbone_trains_only_the_head_until_unfrozen(setup) -> None:  # noqa: ANN001
    spec, data = setup
    hp = Hyperparams(freeze_depth=5, unfreeze_at_epoch=2, batch_size=32, augment="none")
    from raytune_ft.model.build import build_model

    torch.manual_seed(spec.train.seed)  # the trainer's first act: same init as `start`
    start = build_model("resnet18", 10, hp).model.state_dict()
    snapshots: list = []

    def report(m: dict, folder: Path | None) -> None:
        snapshots.append(load_checkpoint(folder)[0]["model"])

    train(hp, spec=_every_epoch(spec), data=data, report=report)
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


@pytest.mark.slow  # ~4 s (fast-loop headroom); test_resume_continues_exactly stays fast
@pytest.mark.parametrize("knobs", [
    {"cutmix_alpha": 1.0, "mixup_alpha": 0.2, "layer_decay": 0.6, "head_dropout": 0.2},
])
def test_mixup_cutmix_and_layer_decay_train_and_resume_exactly(setup, tmp_path: Path,  # noqa: ANN001
                                                               knobs: dict) -> None:
    spec, data = setup
    hp = Hyperparams(batch_size=32, augment="light", **knobs)
    spec = _every_epoch(spec)
    full: list = []
    train(hp, spec=spec, data=data, report=_keep(full, tmp_path / "a"))
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m, _ in full)
    # The random draws of mixup/cutmix and dropout are seeded per epoch: resume is exact.
    resumed: list = []
    train(hp, spec=spec, data=data, report=_keep(resumed, tmp_path / "b"),
          resume_from=full[0][1])
    assert resumed[0][0]["train_loss"] == pytest.approx(full[1][0]["train_loss"], rel=1e-5)


def test_trains_from_disk_through_a_dataloader(tmp_path: Path) -> None:
    from PIL import Image

    from raytune_ft.sources import Images

    for cls, colour in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (24 + i, 20), colour).save(tmp_path / "img" / cls / f"{i}.png")
    spec = tiny_spec(tmp_path, extra="").model_copy(deep=True)
    spec = spec.model_validate({**spec.model_dump(), "data": {
        "source": "imagefolder", "root": str(tmp_path / "img"), "image_size": 16,
        "preload": "never", "workers": 1, "val_fraction": 0.2, "test_fraction": 0.2}})
    data = prepare(spec.data)
    assert isinstance(data.train_x, Images)  # streamed, not preloaded
    got: list = []
    result = train(Hyperparams(batch_size=8, augment="light", lr=0.01), spec=spec, data=data,
                   report=lambda m, f: got.append(m), checkpoints=False)
    assert [m["epoch"] for m in got] == [1, 2] and got[-1]["images_per_s"] > 0
    # Streamed validation sees the very pixels a preloaded run would.
    held = prepare(spec.data.model_copy(update={"preload": "always"}), workers=0)
    assert isinstance(held.val_x, torch.Tensor) and torch.equal(held.val_y, data.val_y)
    loss, acc = evaluate(result.model, held.val_x, held.val_y)
    assert (acc, loss) == pytest.approx((got[-1]["val_acc"], got[-1]["val_loss"]), rel=1e-5)
