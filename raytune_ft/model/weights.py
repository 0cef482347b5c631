"""What a `model.weights:` value is, decided in one place.

A weights string is one of: `none`; `rtft:NAME`, a backbone rtft pretrains itself; a
torchvision weights name of the architecture (`DEFAULT`, `IMAGENET1K_V1`); a state-dict file
(`.pth`, `.pt`, `.safetensors`); a promoted rtft model folder; or a storage URI, which no loader
reads (it is refused as a missing file). :func:`classify` says which; the spec, the model
builder, pretraining and job submission all ask it instead of testing the string themselves.

Names and metadata come from :mod:`raytune_ft.model.registry` (the spec schema imports this
module, and checking a spec must not import torchvision); torchvision itself is imported only
to hand its weights enum to the loader. Nothing is ever downloaded here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raytune_ft.errors import UserError
from raytune_ft.model import registry as tv_registry
from raytune_ft.paths import is_uri

__all__ = [
    "RECIPE_PREFIX",
    "WeightsKind",
    "WeightsRef",
    "absolute",
    "classify",
    "torchvision_name",
    "torchvision_names",
    "torchvision_weights",
    "weights_meta",
]

RECIPE_PREFIX = "rtft:"
WeightsKind = Literal["none", "recipe", "torchvision", "file", "promoted", "uri"]


@dataclass(frozen=True)
class WeightsRef:
    """A `weights:` value and what it names (see :func:`classify`)."""

    value: str
    kind: WeightsKind

    @property
    def recipe(self) -> str:
        """The recipe name of an `rtft:NAME` value (`mnist`); empty for other kinds."""
        return self.value.removeprefix(RECIPE_PREFIX) if self.kind == "recipe" else ""

    @property
    def is_path(self) -> bool:
        """Whether the value names a file or folder (here or, for a URI, in remote storage)
        rather than a name resolved by torchvision or rtft."""
        return self.kind in ("file", "promoted", "uri")


def _probe(check: Callable[[], object]) -> bool:
    # A spec is validated before anything else looks at it, and any string may arrive there:
    # a name too long for the OS, a NUL byte or `~nobody` must read as "no such file", never
    # raise from the loader.
    try:
        return bool(check())
    except (OSError, ValueError, RuntimeError):
        return False


def classify(value: str) -> WeightsRef:
    """Say what the weights string `value` names. Rules, in order:

    - ``none`` → `none`; ``rtft:NAME`` → `recipe`; ``scheme://…`` → `uri`;
    - a path (holds ``/``, ``\\`` or ``.``, or is a bare word naming something that exists in
      the working folder) → `promoted` when it is a folder, else `file` (which need not exist:
      loading it says so);
    - any other bare word → `torchvision` (``DEFAULT``, ``IMAGENET1K_V1``; whether the
      architecture has such weights is for :func:`torchvision_weights` to say).

    Only existence is looked up on disk; the file is not opened. (An empty string is the
    working folder, `Path("")`, as the model loader has always read it.)
    """
    if value == "none":
        return WeightsRef(value, "none")
    if value.startswith(RECIPE_PREFIX):
        return WeightsRef(value, "recipe")
    if is_uri(value):
        return WeightsRef(value, "uri")
    # torchvision names are identifiers, never holding these characters. A bare word that
    # exists here (`backbone`, no suffix) is the user's file: it wins over a same-named enum.
    if any(c in value for c in "/\\.") or _probe(Path(value).exists):
        is_dir = _probe(lambda: Path(value).expanduser().is_dir())
        return WeightsRef(value, "promoted" if is_dir else "file")
    return WeightsRef(value, "torchvision")


def absolute(value: str) -> str:
    """`value` with a file or folder that exists here, named relative to the working folder,
    made absolute (trials run in their own folders); every other value is returned as given."""
    if classify(value).kind not in ("file", "promoted"):
        return value
    try:
        p = Path(value).expanduser()
        return str(p.resolve()) if p.exists() else value
    except (OSError, ValueError, RuntimeError):  # see _probe: not a file this machine has
        return value


def torchvision_names(arch: str) -> list[str]:
    """The weights names torchvision has for `arch`, `DEFAULT` first (the enum's `DEFAULT` is
    an alias of one of its members, and is listed once)."""
    return tv_registry.weights_names(arch)


def torchvision_name(arch: str, name: str) -> str:
    """The member name that weights `name` of `arch` stands for (`DEFAULT` → `IMAGENET1K_V1`),
    read from the registry without importing torchvision.

    Raises :class:`UserError` on `model.weights` listing the names `arch` has.
    """
    meta = tv_registry.weights_meta(arch, name)
    if meta is None:
        raise UserError(f"{arch} has no weights {name!r}; allowed: "
                        f"{', '.join(torchvision_names(arch))}, a file path, rtft:mnist or none",
                        field="model.weights")
    return meta["name"].split(".", 1)[1]


def torchvision_weights(arch: str, name: str) -> Any:
    """The torchvision weights enum member `name` (or `DEFAULT`) of `arch`, for loading.

    Raises :class:`UserError` on `model.weights` listing the names `arch` has.
    """
    from torchvision.models import get_model_weights

    return get_model_weights(arch)[torchvision_name(arch, name)]


def weights_meta(arch: str, name: str) -> dict[str, Any] | None:
    """The torchvision metadata of weights `name` for `arch`: crop size, resize size, mean,
    std and the full name; None when `name` is not torchvision weights of `arch` (a file,
    `rtft:`, `none`, an unknown name or architecture). Nothing is downloaded or imported."""
    if classify(name).kind != "torchvision":
        return None
    return tv_registry.weights_meta(arch, name)
