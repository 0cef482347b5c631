"""torchvision's model registry (architecture names, their weights names and each weights'
transform metadata) without importing torchvision.

Importing torchvision takes about 3 s on a small machine (it pulls in `torch._dynamo` through
`torchvision.ops`), yet checking a spec needs only names and crop sizes. A snapshot of the
registry ships beside this module as `registry.json`, with the torchvision version it was
read from. It is used only when that version is the installed one (read from the package's
metadata, not by importing it); any other torchvision is read live. So the snapshot can make a
check faster but never different: `tests/test_tv_registry.py` compares it with the live
registry of the installed torchvision.

Refresh it after changing the torchvision pin:

    python -m raytune_ft.model.registry > raytune_ft/model/registry.json
"""

from __future__ import annotations

import functools
import json
from importlib import metadata
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).with_name("registry.json")


def read_live() -> dict[str, Any]:
    """The registry read from the installed torchvision (imports it): ``{"torchvision":
    version, "models": {arch: {"default": name, "weights": {name: meta}}}}`` where meta holds
    crop_size, resize_size, mean and std. Only classification models (what rtft fine-tunes)."""
    import torchvision
    from torchvision import models

    out: dict[str, Any] = {}
    for arch in sorted(models.list_models(module=models)):
        enum = models.get_model_weights(arch)
        weights = {}
        for name, w in enum.__members__.items():
            if name == "DEFAULT":
                continue
            t = w.transforms()
            weights[name] = {"crop_size": int(t.crop_size[0]),
                             "resize_size": int(t.resize_size[0]),
                             "mean": list(t.mean), "std": list(t.std)}
        out[arch] = {"default": enum.DEFAULT.name if "DEFAULT" in enum.__members__ else None,
                     "weights": weights}
    return {"torchvision": torchvision.__version__.split("+")[0], "models": out}


def _installed_version() -> str | None:
    try:
        return metadata.version("torchvision").split("+")[0]
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, Any]:
    """The registry: the shipped snapshot when it was read from the installed torchvision,
    else read live (see the module's docstring)."""
    try:
        snap = json.loads(SNAPSHOT.read_text())
    except (OSError, ValueError):
        snap = None
    if snap is not None and snap.get("torchvision") == _installed_version():
        return snap
    return read_live()


def archs() -> list[str]:
    """The classification architectures torchvision has, sorted."""
    return list(registry()["models"])


def weights_names(arch: str) -> list[str]:
    """The weights names of `arch`, `DEFAULT` first (KeyError: not an architecture)."""
    return ["DEFAULT", *registry()["models"][arch]["weights"]]


def weights_meta(arch: str, name: str) -> dict[str, Any] | None:
    """crop_size, resize_size, mean, std and the full name (``resnet18.IMAGENET1K_V1``) of
    weights `name` (or `DEFAULT`) of `arch`; None when torchvision has no such weights."""
    entry = registry()["models"].get(arch)
    if entry is None:
        return None
    full = entry["default"] if name == "DEFAULT" else name
    meta = entry["weights"].get(full) if full else None
    if meta is None:
        return None
    return {**meta, "mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
            "name": f"{arch}.{full}"}


if __name__ == "__main__":
    print(json.dumps(read_live(), indent=0, sort_keys=True))
