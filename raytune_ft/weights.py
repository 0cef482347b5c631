"""What a `model.weights:` value is, decided in one place.

A weights string is one of: `none`; `rtft:NAME`, a backbone rtft pretrains itself; a
torchvision weights name of the architecture (`DEFAULT`, `IMAGENET1K_V1`); a state-dict file
(`.pth`, `.pt`, `.safetensors`); a promoted rtft model folder; or a storage URI, which no loader
reads (it is refused as a missing file). :func:`classify` says which; the spec, the model
builder, pretraining and job submission all ask it instead of testing the string themselves.

torchvision is imported only inside the functions that read its registry (the spec schema
imports this module, and must stay cheap to import); nothing is ever downloaded here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raytune_ft.errors import UserError
from raytune_ft.paths import is_uri

__all__ = [
    "RECIPE_PREFIX",
    "WeightsKind",
    "WeightsRef",
    "absolute",
    "classify",
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
    """The weights names torchvision has for `arch`, `DEFAULT` first and listed once (the
    enum's `DEFAULT` is an alias of one of its members, so it appears among them too)."""
    from torchvision.models import get_model_weights

    return list(dict.fromkeys(["DEFAULT", *get_model_weights(arch).__members__]))


def _member(arch: str, name: str) -> Any:
    """The enum member; KeyError for a name `arch` lacks, ValueError for an unknown `arch`."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    return enum.DEFAULT if name == "DEFAULT" else enum[name]


def torchvision_weights(arch: str, name: str) -> Any:
    """The torchvision weights enum member `name` (or `DEFAULT`) of `arch`.

    Raises :class:`UserError` on `model.weights` listing the names `arch` has.
    """
    try:
        return _member(arch, name)
    except KeyError as e:
        raise UserError(f"{arch} has no weights {name!r}; allowed: "
                        f"{', '.join(torchvision_names(arch))}, a file path, rtft:mnist or none",
                        field="model.weights") from e


def weights_meta(arch: str, name: str) -> dict[str, Any] | None:
    """The torchvision metadata of weights `name` for `arch`: crop size, resize size, mean,
    std and the full name; None when `name` is not torchvision weights of `arch` (a file,
    `rtft:`, `none`, an unknown name or architecture). Nothing is downloaded."""
    if classify(name).kind != "torchvision":
        return None
    try:
        w = _member(arch, name)
    except (KeyError, ValueError):
        return None
    t = w.transforms()
    return {"crop_size": int(t.crop_size[0]), "resize_size": int(t.resize_size[0]),
            "mean": tuple(t.mean), "std": tuple(t.std), "name": f"{arch}.{w.name}"}
