"""Fixed-seed stratified train/val/test splits, and batches for the trainer.

Small image sets (the built-in ones, CIFAR-sized ones, anything under `data.preload_max_gb`)
are decoded once into uint8 tensors (N, 3, H, W): a trial indexes batches directly, with no
DataLoader worker processes, and the search puts the splits into Ray's object store once so
every trial on a node shares them. Larger sets stay on disk as :class:`Images` (a file list
or a torchvision dataset) and are streamed by a DataLoader with the trial's CPUs as workers
and pinned memory on GPU. The trainer sees both through :func:`iter_batches`. Reading each
source is :mod:`raytune_ft.sources`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from raytune_ft.sources import Dataset, Images, Pixels, load_dataset
from raytune_ft.spec.schema import DataSpec, Spec

# Dataset, Images, Pixels and load_dataset live in sources; importing them from here still works.
__all__ = ["Dataset", "Images", "Pixels", "Splits", "augment_batch", "data_record",
           "iter_batches", "load_dataset", "make_splits", "normalize", "prepare", "prepare_each",
           "recorded_fingerprint"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _decode_all(images: Images, workers: int) -> torch.Tensor:
    """Decode every image once (in worker processes when there are many) into one tensor."""
    from torch.utils.data import DataLoader

    if len(images) == 0:
        return torch.zeros(0, 3, images.size, images.size, dtype=torch.uint8)
    n_workers = workers if len(images) >= 512 else 0  # process start-up costs more than that
    loader = DataLoader(images, batch_size=256, num_workers=n_workers)
    return torch.cat(list(loader))


def iter_batches(x: Pixels, y: torch.Tensor, order: torch.Tensor, batch_size: int, *,
                 device: torch.device, workers: int = 0, drop_last: bool = False,
                 generator: torch.Generator | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels) batches on `device` in `order`.

    Tensors are sliced where they are (on the device already for small sets); :class:`Images`
    are read by a DataLoader with `workers` processes, pinned memory on GPU.
    """
    n = len(order) - (len(order) % batch_size if drop_last else 0)
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    y = y.to(device)
    if isinstance(x, torch.Tensor):
        for idx in chunks:
            idx = idx.to(x.device)
            yield x[idx], y[idx.to(y.device)]
        return
    from torch.utils.data import DataLoader

    # The sampler yields whole batches in our order; DataLoader seeds its workers from
    # `generator`, so random crops repeat exactly on resume.
    loader = DataLoader(x, batch_sampler=[c.tolist() for c in chunks], num_workers=workers,
                        pin_memory=device.type == "cuda", generator=generator,
                        persistent_workers=False)
    for idx, xb in zip(chunks, loader, strict=True):
        yield xb.to(device, non_blocking=True), y[idx.to(y.device)]


@dataclass(frozen=True)
class Splits:
    """Train/val/test images and labels plus what is needed to record provenance."""

    train_x: Pixels
    train_y: torch.Tensor
    val_x: Pixels
    val_y: torch.Tensor
    test_x: Pixels
    test_y: torch.Tensor
    classes: list[str]
    fingerprint: dict = field(default_factory=dict)
    # The teacher's logits on train_x, row for row (`model.teacher`; None without one):
    # computed once in the driver, they travel to the trials with the images.
    teacher_logits: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def without_test(self) -> Splits:
        """The splits a trial may see: the held-out test set is dropped, not just ignored."""
        empty_x = self.test_x[:0] if isinstance(self.test_x, torch.Tensor) \
            else self.test_x.subset(torch.zeros(0, dtype=torch.long))
        return Splits(self.train_x, self.train_y, self.val_x, self.val_y, empty_x,
                      self.test_y[:0], self.classes, self.fingerprint, self.teacher_logits)




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


def _take(x: Pixels, idx: torch.Tensor) -> Pixels:
    return x[idx] if isinstance(x, torch.Tensor) else x.subset(idx)


def _pixels_digest(h: Any, x: Pixels, files: list[str]) -> None:
    if isinstance(x, torch.Tensor):
        h.update(x.numpy().tobytes())
        return
    # Files: names, sizes and modification times, not their bytes (a large set stays cheap).
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())


def prepare(data: DataSpec, *, workers: int | None = None) -> Splits:
    """Load the source and split it (stratified, seeded, where the source gives no split of its
    own); decode images up front when they fit `data.preload_max_gb`. The fingerprint records
    what exactly was used: a hash of the pixels (or of the file list), counts per class."""
    ds = load_dataset(data)
    given = dict(ds.given)
    val_f = 0.0 if "val" in given else data.val_fraction
    test_f = 0.0 if "test" in given else data.test_fraction
    tr, va, te = make_splits(ds.labels, val_f, test_f, data.split_seed)
    if data.train_limit is not None:
        tr = tr[: data.train_limit]
    parts = {"train": (_take(ds.images, tr), ds.labels[tr]),
             "val": given.get("val") or (_take(ds.images, va), ds.labels[va]),
             "test": given.get("test") or (_take(ds.images, te), ds.labels[te])}
    n_classes = len(ds.classes)
    for split in ("val", "test"):
        missing = [ds.classes[c] for c in range(n_classes)
                   if c not in set(parts[split][1].tolist())]
        if missing:
            log.warning("the %s split has no example of class(es) %s (too few images per class "
                        "for val/test fractions)", split, ", ".join(missing[:10]))
    lazy = [k for k, (x, _) in parts.items() if isinstance(x, Images)]
    size_gb = sum(parts[k][0].nbytes for k in lazy) / 2**30
    if lazy and (data.preload == "always" or (data.preload == "auto"
                                              and size_gb <= data.preload_max_gb)):
        n_workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
        for k in lazy:
            x, y = parts[k]
            parts[k] = (_decode_all(x, n_workers), y)
    h = hashlib.sha256()
    _pixels_digest(h, ds.images, ds.files)
    for t in (ds.labels, tr, va, te):
        h.update(t.numpy().tobytes())
    fingerprint = {
        "source": data.source, "sha256": h.hexdigest()[:16],
        **{k: len(parts[k][1]) for k in parts},
        **{f"{k}_per_class": torch.bincount(parts[k][1], minlength=n_classes).tolist()
           for k in parts},
        "classes": ds.classes if n_classes <= 200 else n_classes,
        "preloaded": not any(isinstance(x, Images) for x, _ in parts.values()),
    }
    if ds.files:
        fingerprint["files"] = len(ds.files)
    (trx, try_), (vax, vay), (tex, tey) = parts["train"], parts["val"], parts["test"]
    return Splits(trx, try_, vax, vay, tex, tey, ds.classes, fingerprint)


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


def prepare_each(spec: Spec, *, workers: int | None = None) -> dict[int, Splits]:
    """The splits of every input size the spec's architectures take, keyed by image size in
    the order of `spec.archs`: one entry for a single architecture, or when every architecture
    of a `model.arch` choice takes the same size (the same `data.image_size`, or weights with
    the same crop size). Each size is read and split once; the split itself (which image is
    train, val or test) is the same at every size: it depends on the labels and seed only."""
    out: dict[int, Splits] = {}
    for arch in spec.archs:
        data = spec.for_arch(arch).data
        if data.image_size not in out:
            out[int(data.image_size)] = prepare(data, workers=workers)
    return out


def data_record(by_size: dict[int, Splits]) -> dict[str, Any]:
    """What a run's `data.json` holds: the fingerprint of its (first) input size; with a
    `model.arch` choice whose architectures take several sizes, each size's fingerprint too,
    under `by_image_size` (the pixels, and so the hash, differ per size)."""
    first = next(iter(by_size.values())).fingerprint
    if len(by_size) == 1:
        return first
    return {**first, "by_image_size": {str(k): s.fingerprint for k, s in by_size.items()}}


def recorded_fingerprint(record: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The fingerprint `data.json` (:func:`data_record`) recorded for `image_size`."""
    return record.get("by_image_size", {}).get(str(image_size), record)
