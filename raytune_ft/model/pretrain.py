"""Backbones rtft pretrains itself, offline: `model.weights: rtft:mnist`.

No ImageNet weights can be downloaded on an offline machine, so the default search starts
from a resnet18 pretrained here on 5,000 real MNIST digits, with our own trainer. The result
is an ordinary torchvision-format state dict in the cache, loaded by the same code path as a
user's `.pth` file. It is built once per (recipe, arch, image size) and reused.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from raytune_ft.checkpoint import honour_umask
from raytune_ft.data import prepare
from raytune_ft.knobs import Hyperparams
from raytune_ft.model.build import RECIPES, recipe_path
from raytune_ft.model.weights import classify
from raytune_ft.spec.schema import DataSpec, Spec, TrainSpec
from raytune_ft.train import evaluate, train

__all__ = ["ensure_backbone", "pretrain"]


def pretrain(name: str, arch: str, image_size: int, *, echo: Callable[[str], None] = print,
             num_threads: int | None = None) -> Path:
    """Train recipe `name` for `arch` and write it (atomically) to its cache file."""
    recipe = RECIPES[name]
    path = recipe_path(name, arch, image_size)
    data_spec = DataSpec(source=recipe["source"], image_size=image_size,
                         val_fraction=recipe["val_fraction"],
                         test_fraction=recipe["test_fraction"], split_seed=recipe["seed"])
    spec = Spec(name=f"pretrain-{name}", model={"arch": arch, "weights": "none"},
                data=data_spec, train=TrainSpec(max_epochs=recipe["epochs"], seed=recipe["seed"]))
    hp = Hyperparams(lr=recipe["lr"], batch_size=recipe["batch_size"], augment=recipe["augment"],
                     bn_momentum=recipe.get("bn_momentum"))
    data = prepare(data_spec)
    echo(f"pretraining {arch} on {len(data.train_x)} {recipe['source']} images "
         f"({recipe['epochs']} epochs, once; cached at {path})")

    def report(m: dict, _: object) -> None:
        echo(f"  pretrain epoch {m['epoch']}/{recipe['epochs']}: val_acc {m['val_acc']:.3f} "
             f"({m['images_per_s']:.0f} img/s)")

    result = train(hp, spec=spec, data=data, report=report, checkpoints=False,
                   num_threads=num_threads or os.cpu_count())
    _, test_acc = evaluate(result.model, data.test_x, data.test_y)
    echo(f"  pretrained backbone: held-out {recipe['source']} accuracy {test_acc:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({k: v.cpu() for k, v in result.model.state_dict().items()}, tmp)
    honour_umask(tmp)  # mkstemp makes it 0600: a shared cache must be readable by others
    os.replace(tmp, path)
    return path


def ensure_backbone(spec: Spec, *, echo: Callable[[str], None] = print) -> list[Path]:
    """Build the spec's `rtft:` backbone(s) that are not cached yet: one per architecture of a
    `model.arch` choice whose weights name a recipe. Returns every such backbone's cache file,
    in the order of `spec.archs` (empty when no architecture's weights are a recipe)."""
    paths = []
    for arch in spec.archs:
        one = spec.for_arch(arch)
        ref = classify(one.model.weights)
        if ref.kind != "recipe":
            continue
        size = one.data.image_size
        path = recipe_path(ref.recipe, arch, size)
        paths.append(path if path.exists() else pretrain(ref.recipe, arch, size, echo=echo))
    return paths
