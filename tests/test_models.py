"""Models: heads, stages, freezing, activations, init, weight files (no pretrained downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from raytune_ft.models import build_model, freeze_stages, load_state_file, param_groups
from raytune_ft.spec import Hyperparams, SpecError

FAMILIES = [  # arch, stage count, head path
    ("resnet18", 5, "fc"),
    ("mobilenet_v3_small", 13, "classifier.3"),
    ("efficientnet_b0", 9, "classifier.1"),
    ("regnet_y_400mf", 5, "fc"),
    ("convnext_tiny", 8, "classifier.2"),
    ("vit_b_16", 13, "heads.head"),
]


@pytest.mark.parametrize("arch, n_stages, head", FAMILIES)
def test_family_head_and_stages(arch: str, n_stages: int, head: str) -> None:
    built = build_model(arch, 7, Hyperparams(head_hidden=16))
    assert built.head_path == head and len(built.stages) == n_stages
    linears = [m for m in built.head.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == 7 and linears[0].out_features == 16
    frozen = freeze_stages(built, 2)
    frozen_ids = {id(p) for s in built.stages[:2] for p in s.parameters()}
    for p in built.model.parameters():
        assert p.requires_grad == (id(p) not in frozen_ids)
    assert all(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen)


def test_frozen_batchnorm_statistics_stay_fixed_after_a_step() -> None:
    built = build_model("resnet18", 3, Hyperparams())
    norms = freeze_stages(built, 2)
    before = {id(m): m.running_mean.clone() for m in norms}
    trainable_bn = built.model.layer3[0].bn1
    live_before = trainable_bn.running_mean.clone()
    model = built.model.train()
    for m in norms:
        m.eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    opt.step()
    assert all(torch.equal(m.running_mean, before[id(m)]) for m in norms)
    assert not torch.equal(trainable_bn.running_mean, live_before)
    assert built.model.conv1.weight.grad is None  # frozen: no gradient at all


@pytest.mark.parametrize("scope, relus_left", [("head", True), ("all", False)])
def test_activation_scope(scope: str, relus_left: bool) -> None:
    built = build_model("resnet18", 3, Hyperparams(activation="gelu", activation_scope=scope,
                                                   head_hidden=8))
    backbone = [m for n, m in built.model.named_modules() if not n.startswith("fc")]
    assert any(isinstance(m, nn.ReLU) for m in backbone) == relus_left
    assert any(isinstance(m, nn.GELU) for m in built.head.modules())


@pytest.mark.parametrize("init, check", [
    ("orthogonal", lambda w: torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-5)),
    ("trunc_normal", lambda w: w.abs().max() <= 0.04 + 1e-6),
    ("xavier_uniform", lambda w: w.abs().max() <= (6 / sum(w.shape)) ** 0.5 + 1e-6),
])
def test_init_schemes_apply_to_head(init: str, check) -> None:  # noqa: ANN001
    built = build_model("resnet18", 5, Hyperparams(init=init))
    lin = built.head[-1]
    assert check(lin.weight.detach()) and torch.count_nonzero(lin.bias) == 0


def test_reinit_blocks_changes_only_the_last_blocks(backbone_file: Path) -> None:
    keep = build_model("resnet18", 3, Hyperparams(), str(backbone_file)).model.state_dict()
    re = build_model("resnet18", 3, Hyperparams(reinit_blocks=1, init="kaiming_normal"),
                     str(backbone_file)).model.state_dict()
    assert torch.equal(keep["layer4.0.conv1.weight"], re["layer4.0.conv1.weight"])
    assert not torch.equal(keep["layer4.1.conv1.weight"], re["layer4.1.conv1.weight"])


def test_state_dict_file_gives_same_backbone_outputs(backbone_file: Path) -> None:
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict(torch.load(backbone_file, weights_only=True))
    built = build_model("resnet18", 4, Hyperparams(), str(backbone_file))
    ref.fc = nn.Identity()
    built.model.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    ref.eval(), built.model.eval()
    assert torch.allclose(ref(x), built.model(x), atol=1e-6)


def test_safetensors_file_loads(tmp_path: Path, backbone_file: Path) -> None:
    from safetensors.torch import save_file

    state = torch.load(backbone_file, weights_only=True)
    save_file(state, str(tmp_path / "w.safetensors"))
    assert load_state_file(tmp_path / "w.safetensors").keys() == state.keys()


def test_mismatched_weights_name_the_keys(tmp_path: Path, backbone_file: Path) -> None:
    state = torch.load(backbone_file, weights_only=True)
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    del state["layer2.0.bn1.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(SpecError) as info:
        build_model("resnet18", 3, Hyperparams(), str(bad))
    msg = str(info.value)
    assert "layer2.0.bn1.bias" in msg and "layer1.0.conv1.weight (3, 3) vs (64, 64, 3, 3)" in msg


class _Evil:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("touch /tmp/rtft-owned",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Evil()}, evil)
    if os.path.exists("/tmp/rtft-owned"):
        os.remove("/tmp/rtft-owned")
    with pytest.raises(SpecError, match="weights_only=True"):
        build_model("resnet18", 3, Hyperparams(), str(evil))
    assert not os.path.exists("/tmp/rtft-owned")


def test_unknown_torchvision_weights_name_lists_allowed() -> None:
    with pytest.raises(SpecError, match="IMAGENET1K_V1"):
        build_model("resnet18", 3, Hyperparams(), "IMAGENET9K")


def test_param_groups_lr_mult_and_no_decay_on_norms_and_biases() -> None:
    built = build_model("resnet18", 3, Hyperparams())
    groups = {g["name"]: g for g in param_groups(built, lr=0.1, weight_decay=0.01,
                                                 backbone_lr_mult=0.1)}
    assert groups["head"]["lr"] == 0.1 and groups["backbone"]["lr"] == pytest.approx(0.01)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in groups["backbone_no_decay"]["params"])
    assert all(p.ndim > 1 for p in groups["backbone"]["params"])
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(built.model.parameters()))
