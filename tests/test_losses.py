"""The training losses (train.focal_loss / loss_function) and the sigmoid activation, in the
trainer: hand computations on tiny tensors, gamma 0 against cross-entropy, one real run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_spec

from raytune_ft.data import prepare
from raytune_ft.knobs import Hyperparams
from raytune_ft.model.build import build_model
from raytune_ft.spec.yaml_io import parse_spec
from raytune_ft.train import focal_loss, loss_function, train

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
TARGET = torch.tensor([0, 2])


def _softmax_rows() -> list[list[float]]:
    return [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in LOGITS.tolist()]


def test_focal_loss_matches_a_hand_computation() -> None:
    p = _softmax_rows()
    gamma = 2.0
    by_hand = sum(-(1 - p[i][t]) ** gamma * math.log(p[i][t])
                  for i, t in enumerate(TARGET.tolist())) / 2
    assert focal_loss(LOGITS, TARGET, gamma=gamma).item() == pytest.approx(by_hand, rel=1e-6)


def test_focal_loss_soft_targets_and_smoothing_match_a_hand_computation() -> None:
    # The soft-target form sum_c -y_c (1 - p_c)^gamma log p_c, with y mixed towards uniform.
    p, gamma, ls = _softmax_rows(), 1.5, 0.1
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    ys = [[y * (1 - ls) + ls / 3 for y in row] for row in soft.tolist()]
    by_hand = sum(-ys[i][c] * (1 - p[i][c]) ** gamma * math.log(p[i][c])
                  for i in range(2) for c in range(3)) / 2
    got = focal_loss(LOGITS, soft, gamma=gamma, label_smoothing=ls)
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    # Hard labels with smoothing are the soft form of their smoothed one-hot rows.
    hard = focal_loss(LOGITS, TARGET, gamma=gamma, label_smoothing=ls)
    onehot = F.one_hot(TARGET, 3).float()
    assert hard.item() == pytest.approx(
        focal_loss(LOGITS, onehot, gamma=gamma, label_smoothing=ls).item(), rel=1e-6)


@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("soft", [False, True])
def test_gamma_zero_is_cross_entropy_exactly(ls: float, soft: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    target = torch.softmax(torch.randn(8, 5), 1) if soft else torch.randint(0, 5, (8,))
    want = F.cross_entropy(logits, target, label_smoothing=ls)
    assert torch.equal(focal_loss(logits, target, gamma=0.0, label_smoothing=ls), want)
    hp = Hyperparams(loss="focal", focal_gamma=0.0, label_smoothing=ls)
    assert torch.equal(loss_function(hp)(logits, target), want)
    # The general formula (not the gamma-0 shortcut) tends to cross-entropy too.
    near = focal_loss(logits, target, gamma=1e-9, label_smoothing=ls)
    assert near.item() == pytest.approx(want.item(), rel=1e-6)


def test_focal_gradient_is_finite_where_the_model_is_certain() -> None:
    # p_t rounds to 1 in float32: (1 - p)^gamma with gamma < 1 would give a NaN gradient.
    logits = torch.tensor([[40.0, 0.0, -3.0]], requires_grad=True)
    focal_loss(logits, torch.tensor([0]), gamma=0.5).backward()
    assert torch.isfinite(logits.grad).all()


def test_loss_and_sigmoid_are_searchable_knobs() -> None:
    spec = parse_spec("name: t\nsearch:\n  loss: {space: choice, values: [cross_entropy, focal]}\n"
                      "  focal_gamma: {space: uniform, low: 0.5, high: 3.0, when: {loss: focal}}\n"
                      "  activation: {space: choice, values: [relu, sigmoid]}\n", file="t.yaml")
    assert spec.search["focal_gamma"].when == {"loss": "focal"}
    head = build_model("resnet18", 3, Hyperparams(activation="sigmoid", head_hidden=4)).head
    assert any(isinstance(m, torch.nn.Sigmoid) for m in head.modules())


def test_focal_loss_and_sigmoid_head_train_in_the_trainer(tmp_path) -> None:  # noqa: ANN001
    spec = tiny_spec(tmp_path)
    hp = Hyperparams(batch_size=32, augment="none", loss="focal", focal_gamma=2.0,
                     activation="sigmoid", head_hidden=16, label_smoothing=0.1, mixup_alpha=0.2)
    got: list = []
    result = train(hp, spec=spec, data=prepare(spec.data), report=lambda m, f: got.append(m),
                   checkpoints=False)
    assert [m["epoch"] for m in got] == [1, 2] and not result.diverged
    assert all(math.isfinite(m["train_loss"]) and m["train_loss"] > 0 for m in got)
