"""Models (models.py, with the families' tables): heads, stages, freezing, activations, init,
weight files (no pretrained downloads). (How a weights value is classified: test_weights.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from raytune_ft.errors import SpecError
from raytune_ft.knobs import Hyperparams
from raytune_ft.model.build import (
    build_model,
    freeze_stages,
    frozen_stages,
    load_state_file,
    param_groups,
    resolve_weights,
)

FAMILIES = [  # arch, stage count, head path, input size the test feeds
    ("resnet18", 5, "fc", 32),
    ("resnet50", 5, "fc", 32),
    ("resnext50_32x4d", 5, "fc", 32),
    ("wide_resnet50_2", 5, "fc", 32),
    ("regnet_y_400mf", 5, "fc", 32),
    ("mobilenet_v2", 19, "classifier.1", 32),
    ("mobilenet_v3_small", 13, "classifier.3", 32),
    ("mnasnet0_5", 17, "classifier.1", 32),
    ("efficientnet_b0", 9, "classifier.1", 32),
    ("convnext_tiny", 8, "classifier.2", 32),
    ("vit_b_16", 13, "heads.head", 224),
]
ARCHS = [f[0] for f in FAMILIES]
SIZE = {f[0]: f[3] for f in FAMILIES}


@pytest.mark.parametrize("arch, n_stages, head, size", FAMILIES)
def test_family_head_and_stages(arch: str, n_stages: int, head: str, size: int) -> None:
    built = build_model(arch, 7, Hyperparams(head_hidden=16))
    assert built.head_path == head and len(built.stages) == n_stages
    linears = [m for m in built.head.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == 7 and linears[0].out_features == 16
    for k in (0, 2, n_stages):
        frozen = freeze_stages(built, k)
        frozen_ids = {id(p) for s in built.stages[:k] for p in s.parameters()}
        for p in built.model.parameters():
            assert p.requires_grad == (id(p) not in frozen_ids)
        assert all(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen)
    # Stages partition the backbone: each parameter in at most one, the head in none.
    ids = [id(p) for s in built.stages for p in s.parameters()]
    assert len(ids) == len(set(ids))
    assert not {id(p) for p in built.head.parameters()} & set(ids)
    built.model.eval()
    assert built.model(torch.randn(1, 3, size, size)).shape == (1, 7)


@pytest.mark.parametrize("depth, fraction, n_stages, frozen", [
    (0, 0.0, 5, 0),
    (2, 0.0, 5, 2),    # the depth alone, as before freeze_fraction
    (9, 0.0, 5, 5),    # clamped to the stages there are
    (0, 0.4, 5, 2),    # 2.0
    (0, 0.4, 13, 5),   # 5.2: the same share of a network with more stages
    (0, 0.5, 5, 3),    # 2.5 rounds half up (Python's round() would give 2)
    (0, 0.9, 5, 5),    # 4.5 -> 5
    (3, 0.2, 5, 3),    # the larger of the two
    (1, 0.5, 13, 7),   # 6.5 -> 7
    (0, 1.0, 13, 13),
])
def test_frozen_stages_from_depth_or_fraction(depth: int, fraction: float, n_stages: int,
                                              frozen: int) -> None:
    hp = Hyperparams(freeze_depth=depth, freeze_fraction=fraction)
    assert frozen_stages(hp, n_stages) == frozen


@pytest.mark.parametrize("arch, n_frozen", [("resnet18", 2), ("mobilenet_v3_small", 5)])
def test_freeze_stages_takes_the_knobs(arch: str, n_frozen: int) -> None:
    built = build_model(arch, 3, Hyperparams())
    freeze_stages(built, Hyperparams(freeze_fraction=0.4))
    frozen = {id(p) for s in built.stages[:n_frozen] for p in s.parameters()}
    assert frozen and all(p.requires_grad == (id(p) not in frozen)
                          for p in built.model.parameters())


class _CountActivations(torch.overrides.TorchFunctionMode):
    """Counts the activation functions a forward pass really calls (modules or functional)."""

    NAMES = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "hardswish", "gelu",
             "elu", "elu_", "mish", "leaky_relu", "leaky_relu_"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_scope_all_swaps_every_activation(arch: str) -> None:
    # resnet18 ReLU(inplace) modules are shared across a block; efficientnet's SiLU sit in
    # squeeze-excite blocks; ViT's GELU in MLP blocks: all must become ELU, gates stay.
    model = build_model(arch, 3, Hyperparams(activation="elu", activation_scope="all"))
    head_only = build_model(arch, 3, Hyperparams(activation="elu", head_hidden=8))
    x = torch.randn(1, 3, SIZE[arch], SIZE[arch])
    got = {}
    for name, built in (("all", model), ("head", head_only)):
        built.model.eval()
        with torch.no_grad(), _CountActivations() as mode:
            built.model(x)
        got[name] = mode.calls
    assert set(got["all"]) <= {"elu", "elu_"} and sum(got["all"].values()) > 0, got["all"]
    assert set(got["head"]) - {"elu", "elu_"}, got["head"]  # the backbone keeps its own


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenet_v3_small",
                                  "regnet_y_400mf"])
def test_frozen_batchnorm_statistics_stay_fixed_after_a_step_every_family(arch: str) -> None:
    built = build_model(arch, 3, Hyperparams())
    norms = freeze_stages(built, 2)
    assert norms
    before = [m.running_mean.clone() for m in norms]
    model = built.model.train()
    for m in norms:
        m.eval()
    live = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            and all(m is not f for f in norms)]
    live_before = [m.running_mean.clone() for m in live]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    assert any(not torch.equal(m.running_mean, b) for m, b in zip(live, live_before,
                                                                   strict=True))
    assert all(p.grad is None for s in built.stages[:2] for p in s.parameters())


def tiny_net(model: dict) -> nn.Module:
    """A factory as a user writes one (model.factory: "model.test_build:tiny_net")."""
    width = int(model["options"].get("width", 8))
    net = nn.Sequential()
    net.add_module("stem", nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU()))
    net.add_module("body", nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()))
    net.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net.add_module("out", nn.Linear(width, 1000))
    return net


def test_factory_model_head_stages_and_weights(tmp_path: Path) -> None:
    from raytune_ft.spec.schema import ModelSpec

    spec = ModelSpec(arch="tiny", factory="model.test_build:tiny_net", options={"width": 6})
    built = build_model(spec, 4, Hyperparams(init="orthogonal"))
    assert built.head_path == "out" and [s.name for s in built.stages] == ["stem", "body",
                                                                            "pool"]
    assert built.model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    freeze_stages(built, 1)
    assert not built.model.stem[0].weight.requires_grad and built.model.body[0].weight.requires_grad
    # Its own state dict (as a user saves it) loads back as pretrained weights.
    torch.save(tiny_net({"options": {"width": 6}}).state_dict(), tmp_path / "t.pth")
    again = build_model(spec, 4, Hyperparams(), str(tmp_path / "t.pth"))
    assert torch.equal(again.model.state_dict()["stem.0.weight"],
                       torch.load(tmp_path / "t.pth", weights_only=True)["stem.0.weight"])
    with pytest.raises(SpecError, match="cannot import 'nowhere.at_all:f'"):
        build_model(ModelSpec(arch="x", factory="nowhere.at_all:f"), 4, Hyperparams())


def test_layer_decay_scales_lr_by_depth() -> None:
    built = build_model("resnet18", 3, Hyperparams())
    groups = param_groups(built, lr=1.0, weight_decay=0.0, layer_decay=0.5)
    lr = {g["name"].removesuffix("_no_decay"): g["lr"] for g in groups}
    assert lr == {"head": 1.0, "00.stem": 0.5 ** 5, "01.layer1": 0.5 ** 4,
                  "02.layer2": 0.5 ** 3, "03.layer3": 0.25, "04.layer4": 0.5}
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(built.model.parameters()))


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


def test_state_dict_file_through_a_spec_gives_the_same_logits(tmp_path: Path,
                                                                backbone_file: Path) -> None:
    import torchvision
    from helpers import tiny_spec

    # A user's torchvision-format state dict (1000-class head), named as the spec's weights.
    spec = tiny_spec(tmp_path, weights=str(backbone_file))
    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict(torch.load(backbone_file, weights_only=True))
    built = build_model(spec.model, 4, Hyperparams(),
                        resolve_weights(spec.model.weights, spec.model.arch,
                                        spec.data.image_size))
    # Same backbone features, and the same logits once the new head holds the old head's rows.
    with torch.no_grad():
        built.head[-1].weight.copy_(ref.fc.weight[:4])
        built.head[-1].bias.copy_(ref.fc.bias[:4])
    x = torch.randn(2, 3, 32, 32)
    ref.eval(), built.model.eval()
    assert torch.allclose(ref(x)[:, :4], built.model(x), atol=1e-5)


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
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch '{self.target}'",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    evil, owned = tmp_path / "evil.pth", tmp_path / "owned"  # the test's own folder only
    torch.save({"conv1.weight": torch.zeros(1), "x": _Evil(owned)}, evil)
    with pytest.raises(SpecError, match="weights_only=True"):
        build_model("resnet18", 3, Hyperparams(), str(evil))
    assert not owned.exists()


def test_unknown_torchvision_weights_name_lists_allowed() -> None:
    with pytest.raises(SpecError, match="IMAGENET1K_V1") as info:
        build_model("resnet18", 3, Hyperparams(), "IMAGENET9K")
    # DEFAULT is an alias inside torchvision's enum: listed once, not twice.
    assert "allowed: DEFAULT, IMAGENET1K_V1, a file path" in str(info.value)


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


def test_relative_weights_file_made_absolute_for_trials(tmp_path: Path, backbone_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from raytune_ft.model.build import absolute_weights

    monkeypatch.chdir(backbone_file.parent)
    assert absolute_weights(backbone_file.name) == str(backbone_file.resolve())
    assert [absolute_weights(w) for w in ("none", "IMAGENET1K_V1", "rtft:mnist")] == \
        ["none", "IMAGENET1K_V1", "rtft:mnist"]


def test_architecture_without_a_family_table_names_the_supported_ones() -> None:
    with pytest.raises(SpecError, match="no head/stage table for architecture 'alexnet'") as e:
        build_model("alexnet", 3, Hyperparams())
    assert e.value.field == "model.arch" and "convnext" in str(e.value)


def test_unloadable_weights_file_quotes_the_first_line_of_why(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file\n")
    with pytest.raises(SpecError, match="cannot be loaded as plain tensors") as e:
        load_state_file(bad)
    assert "\n" not in str(e.value) and e.value.__cause__ is not None
