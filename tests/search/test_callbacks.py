"""Tune callbacks (search/callbacks.py): live progress, a table redrawn in place on a terminal,
plain lines elsewhere; TensorBoard's scalars and HParams (made-up trials)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, TINY_SPEC

from raytune_ft.runs import COST_KEYS
from raytune_ft.search.callbacks import Progress, TensorBoard
from raytune_ft.spec.yaml_io import load_spec, parse_spec

SPEC = load_spec(ROOT / "search_spaces" / "resnet.yaml")


class _Trial:
    def __init__(self, tid: str, epoch: int = 1) -> None:
        self.trial_id, self.status = tid, "RUNNING"
        self.config = {"lr": 0.01, "optimizer": "sgd"}
        self.last_result = {"epoch": epoch, "best_val_acc": 0.5}


def _drive(p: Progress) -> None:
    a, b = _Trial("a"), _Trial("b", epoch=4)
    p.on_trial_start(0, [], a)
    p.on_trial_start(0, [], b)
    p.on_trial_result(0, [a, b], a, {"epoch": 1, "val_acc": 0.5, "best_val_acc": 0.5})
    p.on_trial_complete(0, [a, b], a)
    p.on_trial_complete(0, [b], b)
    p.on_experiment_end([a, b])


@pytest.mark.parametrize("live, quiet", [(True, False), (False, False), (False, True)])
def test_progress_modes(capsys: pytest.CaptureFixture, live: bool, quiet: bool) -> None:
    _drive(Progress(SPEC, print, quiet, live=live))
    out = capsys.readouterr().out
    assert "a stopped by ASHA after epoch 1" in out and "b completed after epoch 4" in out
    assert ("\x1b[" in out) == live  # redrawn in place only on a terminal
    assert ("a start" in out) == (not live and not quiet)
    assert ("1/4" in out) == (not quiet)
    if live:
        assert out.endswith("\x1b[J")  # the table is cleared at the end


class _TbTrial:
    """What Ray's TBXLoggerCallback reads of a trial: its folder, config, searched params."""

    def __init__(self, folder: Path, config: dict) -> None:
        self.local_path, self.config, self.evaluated_params = str(folder), config, config

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def _hparams_data(folder: Path) -> tuple[list[str], dict[str, object]]:
    """(HParams metric tags, the session's hparam values) from a trial's event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(folder))
    ea.Reload()
    metrics: list[str] = []
    values: dict[str, object] = {}
    for content in ea.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("experiment"):
            metrics = [m.name.tag for m in data.experiment.metric_infos]
        if data.HasField("session_start_info"):
            for name, v in data.session_start_info.hparams.items():
                values[name] = v.string_value or v.number_value
    return metrics, values


def test_tensorboard_has_cost_scalars_and_hparams_with_arch(tmp_path: Path) -> None:
    text = TINY_SPEC.format(root=tmp_path, n=2, weights="none").replace(
        "model: {arch: resnet18, weights: none}",
        "model: {arch: {space: choice, values: [resnet18, mobilenet_v3_small]}, weights: none}")
    text = text.replace("  batch_size: 32\n", "  batch_size: 32\n  head_dropout: "
                        "{space: uniform, low: 0, high: 0.5, when: {arch: [resnet18]}}\n")
    spec = parse_spec(text, file="tiny.yaml")
    tb = TensorBoard(spec)
    config = {"arch": "mobilenet_v3_small", "lr": 0.01, "optimizer": "adamw",
              "freeze_depth": 1, "batch_size": 32, "augment": "none"}
    trial = _TbTrial(tmp_path / "trial_a", config)
    cost = {"params": 1_528_106, "flops": 4.3e6, "latency_b1_ms": 5.4, "latency_b32_ms": 27.0}
    for epoch in (1, 2):
        tb.log_trial_result(epoch, trial, {"training_iteration": epoch, "epoch": epoch,
                                           "val_acc": 0.5 + epoch / 10, "best_val_acc": 0.7,
                                           "val_loss": 1.0, "train_loss": 1.1, **cost,
                                           "epoch_s": 2.0 + epoch, "config": config})
    tb.log_trial_end(trial)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(trial.local_path))
    ea.Reload()
    for key in COST_KEYS:  # Ray's own scalars: every numeric metric, each epoch
        assert [e.step for e in ea.Scalars(f"ray/tune/{key}")] == [1, 2], key
    assert ea.Scalars("ray/tune/epoch_s")[-1].value == pytest.approx(4.0)
    metrics, values = _hparams_data(Path(trial.local_path))
    assert {f"ray/tune/{k}" for k in COST_KEYS} <= set(metrics)
    assert "ray/tune/val_acc" in metrics and "ray/tune/best_val_acc" in metrics
    assert values["arch"] == "mobilenet_v3_small"
    assert values["head_dropout"] == "n/a"  # its `when` excludes this arch
    assert values["momentum"] == "n/a"  # inactive with adamw
