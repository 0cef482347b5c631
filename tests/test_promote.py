"""Promotion decisions on made-up trials, and the model folder written and read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_spec

from raytune_ft.data import prepare
from raytune_ft.knobs import Hyperparams
from raytune_ft.promote import (
    PromotedModelError,
    TrialRecord,
    choose,
    load_promoted,
    promote,
    trial_state,
)
from raytune_ft.train import evaluate, train


def rec(tid: str, accs: list[float], *, ckpt: bool = True, diverged: bool = False,
        error: str | None = None) -> TrialRecord:
    hist = [{"epoch": i + 1, "val_acc": a, "val_loss": 1 - a} for i, a in enumerate(accs)]
    if diverged:
        hist.append({"epoch": len(accs) + 1, "val_acc": 0.0, "val_loss": 1e9, "diverged": True})
    return TrialRecord(tid, {"lr": 0.1}, hist, f"/ckpt/{tid}" if ckpt else None, error)


@pytest.mark.parametrize("records, expect", [
    # A one-epoch fluke does not beat trials that trained to the top rung.
    ([rec("fluke", [0.99]), rec("full", [0.5, 0.8, 0.9, 0.91]), rec("mid", [0.6, 0.95])], ["full"]),
    # Best-so-far, not last: b peaked at 0.95 then dropped.
    ([rec("a", [0.5, 0.9]), rec("b", [0.95, 0.85])], ["b", "a"]),
    # Diverged and checkpoint-less trials are never promoted.
    ([rec("d", [0.97, 0.98], diverged=True), rec("n", [0.99, 0.99], ckpt=False), rec("ok", [0.7, 0.8])], ["ok"]),
    ([rec("x", [], ckpt=False)], []),
])
def test_choose(records: list[TrialRecord], expect: list[str]) -> None:
    assert [r.trial_id for r in choose(records, "val_acc", top_k=2)] == expect


def test_choose_val_loss_is_minimised() -> None:
    records = [rec("a", [0.5, 0.9]), rec("b", [0.6, 0.7])]
    assert choose(records, "val_loss")[0].trial_id == "a"


@pytest.mark.parametrize("r, state", [
    (rec("c", [0.1, 0.2, 0.3, 0.4]), "completed"),
    (rec("s", [0.1, 0.2]), "stopped@2"),
    (rec("d", [0.1], diverged=True), "diverged"),
    (rec("f", [0.1], error="ValueError: boom"), "failed"),
    (rec("o", [], error="TrialOOMError: CUDA out of memory with batch_size 512"), "oom"),
])
def test_trial_state(r: TrialRecord, state: str) -> None:
    assert trial_state(r, max_t=4) == state


def test_promote_writes_a_versioned_folder_that_reloads(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    data = prepare(spec.data)
    ckpt_root = tmp_path / "ckpt"
    history: list = []

    def report(m: dict, folder: Path | None) -> None:
        history.append(m)
        shutil.copytree(folder, ckpt_root, dirs_exist_ok=True)

    hp = Hyperparams(batch_size=32, augment="none", head_hidden=8)
    train(hp, spec=spec, data=data, report=report)
    record = TrialRecord("t1", {"batch_size": 32, "head_hidden": 8}, history, str(ckpt_root))
    [first] = promote(spec, [record], data, echo=lambda s: None)
    [second] = promote(spec, [record], data, echo=lambda s: None)
    assert (first.name, second.name) == ("v1", "v2")
    assert not list(first.parent.glob(".tmp-*"))  # nothing half-written left behind
    assert {p.name for p in first.iterdir()} == {
        "model.safetensors", "spec.yaml", "config.json", "metrics.json", "MODEL_CARD.md"}
    metrics = json.loads((first / "metrics.json").read_text())
    loaded = load_promoted(first)
    _, acc = evaluate(loaded.model, data.test_x, data.test_y)
    assert acc == pytest.approx(metrics["test"]["acc"])
    assert metrics["val"]["best_val_acc"] == max(h["val_acc"] for h in history)
    # The promoted spec fixes every parameter: the trial can be re-run alone.
    from raytune_ft.spec_io import load_spec

    again = load_spec(first / "spec.yaml")
    assert again.search["head_hidden"].value == 8 and again.run.num_samples == 1
    # A promoted model is a backbone to fine-tune again (its head is replaced).
    import torch

    from raytune_ft.models import build_model

    again_built = build_model("resnet18", 3, Hyperparams(), str(first))
    theirs = loaded.model.state_dict()
    for k, v in again_built.model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, theirs[k]), k
    assert again_built.head[-1].out_features == 3
    # A corrupted weights file is refused.
    blob = (first / "model.safetensors").read_bytes()
    (first / "model.safetensors").write_bytes(blob[:-8] + b"\0" * 8)
    with pytest.raises(PromotedModelError, match="sha256"):
        load_promoted(first)


def test_not_a_promoted_folder_keeps_its_cause_for_debug(tmp_path: Path) -> None:
    with pytest.raises(PromotedModelError, match="is not a promoted rtft model") as e:
        load_promoted(tmp_path)
    assert isinstance(e.value.__cause__, FileNotFoundError)
