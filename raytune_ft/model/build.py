"""torchvision classifiers prepared for fine-tuning: weights, new head, stages, freezing.

Where each family's head is and what its stages are (and the factory protocol for networks
from outside torchvision) is :mod:`raytune_ft.model.families`; this module loads the weights, puts
on the new head and applies the knobs there.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raytune_ft.errors import UserError, first_line
from raytune_ft.knobs import Hyperparams
from raytune_ft.model.families import Stage, factory_model, family
from raytune_ft.model.weights import absolute, classify, torchvision_weights, weights_meta
from raytune_ft.paths import cache_dir
from raytune_ft.spec.schema import ModelSpec

__all__ = [
    "RECIPES",
    "absolute_weights",
    "Built",
    "Stage",
    "build_model",
    "freeze_stages",
    "frozen_stages",
    "input_stats",
    "load_state_file",
    "param_groups",
    "recipe_path",
    "resolve_weights",
]

# Backbones rtft pretrains itself, offline (`model.weights: rtft:<name>`): the recipe keys the
# cache file, so changing it retrains instead of silently reusing an older backbone.
RECIPES: dict[str, dict] = {
    # bn_momentum 0.1 (most torchvision networks' own): mobilenet_v3's 0.01 leaves its running
    # statistics unsettled after 2 epochs, and the backbone at chance in eval mode.
    "mnist": {"source": "mnist", "epochs": 2, "lr": 1e-3, "batch_size": 64, "augment": "light",
              "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0, "bn_momentum": 0.1},
}


def recipe_path(name: str, arch: str, image_size: int) -> Path:
    """The cache file of recipe `name` for `arch` at `image_size`."""
    if name not in RECIPES:
        raise UserError(f"unknown rtft backbone 'rtft:{name}'; allowed: "
                        f"{', '.join('rtft:' + r for r in RECIPES)}", field="model.weights")
    key = json.dumps({"arch": arch, "image_size": image_size, **RECIPES[name]}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_dir() / "pretrained" / f"{arch}-{name}-{image_size}px-{digest}.pth"


# A weights file named relative to the working folder, made absolute (names, `rtft:` recipes
# and `none` pass through). The name callers know; the rule is weights.absolute.
absolute_weights = absolute


def resolve_weights(weights: str, arch: str, image_size: int) -> str:
    """`rtft:<recipe>` → its cached file (which must exist: `rtft pretrain` makes it); any
    other weights value is returned as given."""
    ref = classify(weights)
    if ref.kind != "recipe":
        return weights
    path = recipe_path(ref.recipe, arch, image_size)
    if not path.exists():
        raise UserError(f"the backbone {weights} for {arch} at {image_size}px is not built yet "
                        f"(expected {path}); run `rtft pretrain SPEC` (rtft search does it "
                        f"automatically)", field="model.weights")
    return str(path)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "mish": lambda: nn.Mish(inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,  # no inplace form
}
# Activation modules a backbone may hold; gates (Sigmoid in squeeze-excite) are not swapped.
_SWAPPABLE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish)


def _init_weight(w: torch.Tensor, scheme: str) -> None:
    fn: dict[str, Callable[[torch.Tensor], object]] = {
        "xavier_uniform": nn.init.xavier_uniform_,
        "xavier_normal": nn.init.xavier_normal_,
        "kaiming_uniform": lambda t: nn.init.kaiming_uniform_(t, nonlinearity="relu"),
        "kaiming_normal": lambda t: nn.init.kaiming_normal_(t, nonlinearity="relu"),
        "orthogonal": nn.init.orthogonal_,
        "trunc_normal": lambda t: nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04),
    }
    fn[scheme](w)


def init_module(module: nn.Module, scheme: str) -> None:
    """Re-initialise every layer under `module`: `default` is PyTorch's own init."""
    for m in module.modules():
        if hasattr(m, "reset_parameters") and not isinstance(m, (nn.Sequential,)):
            m.reset_parameters()  # norms back to 1/0, running stats cleared
        if scheme != "default" and isinstance(m, (nn.Linear, nn.Conv2d)):
            _init_weight(m.weight, scheme)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _make_head(in_features: int, num_classes: int, hp: Hyperparams) -> nn.Module:
    if hp.head_hidden > 0:
        layers: list[nn.Module] = [nn.Dropout(hp.head_dropout),
                                   nn.Linear(in_features, hp.head_hidden),
                                   ACTIVATIONS[hp.activation](),
                                   nn.Linear(hp.head_hidden, num_classes)]
    else:
        layers = [nn.Dropout(hp.head_dropout), nn.Linear(in_features, num_classes)]
    head = nn.Sequential(*layers)
    init_module(head, hp.init)
    return head


def _swap_activations(module: nn.Module, name: str) -> int:
    n = 0
    for parent in module.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, _SWAPPABLE):
                setattr(parent, child_name, ACTIVATIONS[name]())
                n += 1
    return n


@dataclass
class Built:
    """A model ready to fine-tune, with where its head and stages are."""

    model: nn.Module
    head_path: str
    stages: list[Stage]

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.pth`/`.pt` (torch.load, weights only), `.safetensors`, or a
    promoted rtft model folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise UserError(f"weights file {str(p)!r} not found", field="model.weights")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused (code in the file) or not a torch file at all
        raise UserError(f"weights file {str(p)!r} cannot be loaded as plain tensors "
                        f"(torch.load weights_only=True): {first_line(e)}",
                        field="model.weights") from e
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"weights file {str(p)!r} holds a {type(obj).__name__}, not a state "
                        f"dict", field="model.weights")
    return obj


def _torchvision_state(arch: str, name: str) -> dict[str, torch.Tensor]:
    w = torchvision_weights(arch, name)  # UserError listing the names `arch` has
    try:
        return w.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # no network: say where the file goes
        where = Path(torch.hub.get_dir()) / "checkpoints" / w.url.rsplit("/", 1)[-1]
        raise UserError(f"cannot get {arch} weights {w.name} ({type(e).__name__}); without "
                        f"network access, download {w.url} elsewhere and put it at {where}",
                        field="model.weights") from e


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], head_path: str) -> None:
    # The head is always replaced, so its keys (any shape, any class count) are dropped.
    def body(d: dict) -> dict:
        return {k: v for k, v in d.items() if not k.startswith(head_path + ".")}

    own, theirs = body(model.state_dict()), body(state)
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), first: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), first: "
                         f"{', '.join(unexpected[:3])}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), first: {'; '.join(shapes[:3])}")
        raise UserError("the weights do not fit this architecture: " + "; ".join(parts),
                        field="model.weights")
    model.load_state_dict(theirs, strict=False)


def input_stats(model: ModelSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the network expects: from the torchvision weights' metadata when the spec
    names such weights, else ImageNet's (what torchvision, timm and rtft:mnist use)."""
    meta = None if model.factory else weights_meta(model.arch, model.weights)
    if meta:
        return meta["mean"], meta["std"]
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_model(model: ModelSpec | str, num_classes: int, hp: Hyperparams,
                weights: str = "none") -> Built:
    """Build the spec's network, load `weights` into its backbone, put on a new head, apply
    the knobs. `model`: the spec's model section (or a torchvision arch name).

    `weights`: `none`, a torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`), or a file /
    promoted model folder (the caller resolves `rtft:` recipes to their cached file first).
    """
    from torchvision.models import get_model

    if isinstance(model, str):
        model = ModelSpec(arch=model)
    if model.factory:
        net, head_path, stage_fn = factory_model(model)
    else:
        fam = family(model.arch)
        net = get_model(model.arch, weights=None)
        head_path, stage_fn = fam.head(net), fam.stages
    ref = classify(weights)
    if ref.kind != "none":
        # A URI counts as a file here: loading it says it is not found (nothing reads URIs).
        is_file = ref.is_path
        if not is_file and model.factory:
            raise UserError(f"{weights!r}: a model.factory network takes weights from a file "
                            f"(.pth, .safetensors, promoted folder) or none",
                            field="model.weights")
        state = load_state_file(weights) if is_file else _torchvision_state(model.arch, weights)
        _load_backbone(net, state, head_path)

    old = net.get_submodule(head_path)
    parent_path, _, leaf = head_path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    if hp.activation_scope == "all":
        _swap_activations(net, hp.activation)
    setattr(parent, leaf, _make_head(old.in_features, num_classes, hp))

    if hp.bn_momentum is not None:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = hp.bn_momentum
    stages = stage_fn(net)
    if hp.reinit_blocks:
        blocks = [b for s in stages for b in s.blocks()]
        for b in blocks[-hp.reinit_blocks:]:
            init_module(b, hp.init)
    return Built(net, head_path, stages)


def frozen_stages(hp: Hyperparams, n_stages: int) -> int:
    """How many of a network's `n_stages` stages the knobs freeze: `freeze_depth`, or
    `freeze_fraction` of them (rounded half up) where that is more, never past `n_stages`.
    The fraction means the same in every family (0.4 of resnet18's 5 stages is 2, of
    mobilenet_v3_small's 13 is 5); a depth counts one family's stages."""
    by_fraction = math.floor(hp.freeze_fraction * n_stages + 0.5)
    return min(n_stages, max(hp.freeze_depth, by_fraction))


def freeze_stages(built: Built, depth: int | Hyperparams) -> list[nn.Module]:
    """Freeze the first `depth` stages (given knobs: as many as :func:`frozen_stages` says);
    returns their norm layers, which the trainer keeps in eval mode so their running
    statistics stay those of the pretrained backbone."""
    if isinstance(depth, Hyperparams):
        depth = frozen_stages(depth, len(built.stages))
    norms: list[nn.Module] = []
    for p in built.model.parameters():
        p.requires_grad_(True)
    for stage in built.stages[:depth]:
        for p in stage.parameters():
            p.requires_grad_(False)
        norms += [m for mod in stage.modules for m in mod.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return norms


def param_groups(built: Built, *, lr: float, weight_decay: float,
                 backbone_lr_mult: float = 1.0, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups: head at `lr`; backbone stage i of S (from the input) at
    `lr * backbone_lr_mult * layer_decay ** (S - i)` (timm's layer decay; backbone parameters
    outside the stages, such as a final norm, count as the last stage); no weight decay on
    norms and biases (1-d parameters). Frozen parameters are included (they get no gradient
    until unfrozen), so gradual unfreezing needs no new optimizer."""
    head_ids = {id(p) for p in built.head.parameters()}
    n_stages = len(built.stages)
    depth_of: dict[int, int] = {}
    if layer_decay != 1.0:
        for i, stage in enumerate(built.stages):
            for p in stage.parameters():
                depth_of.setdefault(id(p), i)

    def name_scale(p: nn.Parameter) -> tuple[str, float]:
        if id(p) in head_ids:
            return "head", 1.0
        if layer_decay == 1.0:
            return "backbone", backbone_lr_mult
        i = depth_of.get(id(p), n_stages)
        label = built.stages[i].name if i < n_stages else "rest"
        return f"{i:02d}.{label}", backbone_lr_mult * layer_decay ** (n_stages - i)

    groups: dict[tuple[str, bool], tuple[float, list[nn.Parameter]]] = {}
    for p in built.model.parameters():
        name, scale = name_scale(p)
        groups.setdefault((name, p.ndim <= 1), (scale, []))[1].append(p)
    return [{"params": params, "lr": lr * scale,
             "weight_decay": 0.0 if no_decay else weight_decay,
             "name": f"{name}{'_no_decay' if no_decay else ''}"}
            for (name, no_decay), (scale, params) in sorted(groups.items())]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
