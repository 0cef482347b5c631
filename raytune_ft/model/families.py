"""Where a network's head is and what its stages are, so the spec's knobs (`freeze_depth`,
`reinit_blocks`, `activation_scope`, `layer_decay`) mean the same thing for every architecture:
one small table per torchvision family, and the factory protocol for networks from elsewhere.

:mod:`raytune_ft.model.build` builds and prepares the network; this module only says where things
are in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from raytune_ft.errors import UserError
from raytune_ft.spec.schema import ModelSpec

__all__ = ["Family", "Stage", "factory_model", "family"]


@dataclass(frozen=True)
class Stage:
    """A group of modules (and loose parameters) counted as one step of `freeze_depth`."""

    name: str
    modules: tuple[nn.Module, ...]
    params: tuple[nn.Parameter, ...] = ()

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter of the stage: its modules' and its loose ones."""
        return [p for m in self.modules for p in m.parameters()] + list(self.params)

    def blocks(self) -> list[nn.Module]:
        """Re-initialisable units: a container's children, or the modules themselves."""
        out: list[nn.Module] = []
        for m in self.modules:
            kids = list(m.children()) if isinstance(m, (nn.Sequential, nn.ModuleList)) else []
            out.extend(kids or [m])
        return out


@dataclass(frozen=True)
class Family:
    """Where the head is and what the stages are, for every network of one family."""

    head: Callable[[nn.Module], str]  # dotted path of the final Linear to replace
    stages: Callable[[nn.Module], list[Stage]]


def _seq_stages(container: nn.Module, prefix: str) -> list[Stage]:
    return [Stage(f"{prefix}[{i}]", (m,)) for i, m in enumerate(container.children())]


def _last_linear(seq: str) -> Callable[[nn.Module], str]:
    def find(model: nn.Module) -> str:
        sub = model.get_submodule(seq)
        idx = [i for i, m in enumerate(sub.children()) if isinstance(m, nn.Linear)][-1]
        return f"{seq}.{idx}"
    return find


_RESNET = Family(
    head=lambda m: "fc",
    stages=lambda m: [Stage("stem", (m.conv1, m.bn1)), *[
        Stage(f"layer{i}", (getattr(m, f"layer{i}"),)) for i in range(1, 5)]],
)
_FAMILIES: list[tuple[tuple[str, ...], Family]] = [
    (("resnet", "resnext", "wide_resnet"), _RESNET),
    (("regnet",), Family(
        head=lambda m: "fc",
        stages=lambda m: [Stage("stem", (m.stem,)), *_seq_stages(m.trunk_output, "trunk")])),
    (("efficientnet", "mobilenet", "mnasnet"), Family(
        head=_last_linear("classifier"),
        stages=lambda m: _seq_stages(m.features, "features") if hasattr(m, "features")
        else _seq_stages(m.layers, "layers"))),
    (("convnext",), Family(head=_last_linear("classifier"),
                           stages=lambda m: _seq_stages(m.features, "features"))),
    (("vit",), Family(
        head=lambda m: "heads.head",
        stages=lambda m: [Stage("patch_embed", (m.conv_proj,),
                                (m.class_token, m.encoder.pos_embedding)),
                          *_seq_stages(m.encoder.layers, "block")])),
]


def family(arch: str) -> Family:
    """The head/stage table of torchvision architecture `arch` (by its name's prefix)."""
    for prefixes, fam in _FAMILIES:
        if arch.startswith(prefixes):
            return fam
    known = ", ".join(p for ps, _ in _FAMILIES for p in ps)
    raise UserError(f"no head/stage table for architecture {arch!r}; supported families: "
                    f"{known}, or model.factory for any other network", field="model.arch")


# --------------------------------------------------------------------------------------------
# Factory protocol (`model.factory: "package.module:function"`), for networks from outside
# torchvision (timm, in-house code):
#   - the function is called with the spec's `model:` section as a plain dict (arch, weights,
#     options, ...) and returns an `nn.Module` that produces logits;
#   - the module's attribute `rtft_head` (optional) is the dotted path of its final
#     `nn.Linear`, which rtft replaces; default: the last `nn.Linear` in the module;
#   - `rtft_stages` (optional) lists dotted paths of its stages from the input, which
#     `freeze_depth`, `reinit_blocks` and `layer_decay` count; default: its top-level children
#     other than the one holding the head.
# --------------------------------------------------------------------------------------------
def factory_model(model: ModelSpec) -> tuple[nn.Module, str, Callable[[nn.Module], list[Stage]]]:
    """Build `model.factory`'s network; returns it, the dotted path of its head and the
    function that lists its stages (see the factory protocol above)."""
    import importlib

    mod_name, _, fn_name = (model.factory or "").partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import {model.factory!r}: {e}; allowed: an importable "
                        f"'package.module:function'", field="model.factory") from e
    net = fn(model.model_dump(mode="json"))
    if not isinstance(net, nn.Module):
        raise UserError(f"{model.factory} returned a {type(net).__name__}, not an nn.Module",
                        field="model.factory")
    head = getattr(net, "rtft_head", None) or next(
        (n for n, m in reversed(list(net.named_modules())) if isinstance(m, nn.Linear)), None)
    if head is None or not isinstance(net.get_submodule(head), nn.Linear):
        raise UserError(f"{model.factory}: no nn.Linear head found (set `rtft_head` on the "
                        f"module to the dotted path of its final nn.Linear)",
                        field="model.factory")
    paths = getattr(net, "rtft_stages", None)
    if paths is None:
        top = head.split(".")[0]
        paths = [n for n, _ in net.named_children() if n != top]

    def stages(m: nn.Module) -> list[Stage]:
        return [Stage(p, (m.get_submodule(p),)) for p in paths]
    return net, head, stages
