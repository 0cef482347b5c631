"""Data: stratified fixed-seed splits, the built-in sets, ImageFolder with a corrupt file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytune_ft.data import augment_batch, iter_batches, make_splits, normalize, prepare
from raytune_ft.errors import SpecError
from raytune_ft.sources import load_dataset
from raytune_ft.spec.schema import DataSpec


def test_splits_are_stratified_disjoint_and_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(50)
    tr, va, te = make_splits(labels, 0.2, 0.1, seed=3)
    assert len(set(tr.tolist()) | set(va.tolist()) | set(te.tolist())) == 500
    assert len(tr) + len(va) + len(te) == 500
    assert torch.bincount(labels[va]).tolist() == [10] * 10
    assert torch.bincount(labels[te]).tolist() == [5] * 10
    again = make_splits(labels, 0.2, 0.1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((tr, va, te), again, strict=True))
    other = make_splits(labels, 0.2, 0.1, seed=4)
    assert not torch.equal(te, other[2])


def test_digits_prepared_with_fingerprint() -> None:
    s = prepare(DataSpec(source="digits", image_size=16, train_limit=100))
    assert s.train_x.shape == (100, 3, 16, 16) and s.train_x.dtype == torch.uint8
    assert s.num_classes == 10 and s.fingerprint["train"] == 100
    assert s.fingerprint["test"] == len(s.test_y) > 300
    assert len(s.without_test().test_y) == 0  # trials never get the test split
    x = normalize(s.train_x[:4])
    assert x.dtype == torch.float32 and augment_batch(x, "strong").shape == x.shape
    assert torch.equal(augment_batch(x, "none"), x)


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    Image.new("RGB", (20, 14), colour).save(path)


def _tree(root: Path, n: int = 6, classes: tuple = (("cat", (255, 0, 0)), ("dog", (0, 0, 255)))
          ) -> Path:
    for cls, colour in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            _png(root / cls / f"{i}.png", colour)
    return root


@pytest.mark.parametrize("preload", ["always", "never"])
def test_imagefolder_reads_pngs_and_skips_a_corrupt_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, preload: str) -> None:
    _tree(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    s = prepare(DataSpec(source="imagefolder", root=str(tmp_path), image_size=8,
                         preload=preload, val_fraction=0.25, test_fraction=0.25), workers=0)
    assert s.classes == ["cat", "dog"] and s.fingerprint["files"] == 12
    assert "broken.png" in caplog.text
    assert s.fingerprint["train_per_class"] == [2, 2] and s.fingerprint["test"] == 4
    assert s.fingerprint["preloaded"] == (preload == "always")
    assert isinstance(s.train_x, torch.Tensor) == (preload == "always")
    # Either way the trainer's batches are the same pixels: red cats, blue dogs.
    xb, yb = next(iter_batches(s.train_x, s.train_y, torch.arange(4), 4,
                               device=torch.device("cpu")))
    assert xb.shape == (4, 3, 8, 8) and xb.dtype == torch.uint8
    red = xb[:, 0].float().mean((1, 2)) > 200
    assert torch.equal(red, yb == 0)


def test_imagefolder_with_separate_val_and_test_folders(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    _tree(tmp_path / "train")
    # val lists classes in another order on disk (only dog): labels must map by name.
    _tree(tmp_path / "val", n=2, classes=(("dog", (0, 0, 255)),))
    _tree(tmp_path / "test", n=3)
    s = prepare(DataSpec(source="imagefolder", root=str(tmp_path / "train"),
                         val_root=str(tmp_path / "val"), test_root=str(tmp_path / "test"),
                         image_size=8), workers=0)
    assert len(s.train_y) == 12  # nothing carved off train: val and test come from their folders
    assert s.val_y.tolist() == [1, 1] and sorted(s.test_y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert "no images of class(es) cat" in caplog.text
    _tree(tmp_path / "bad", n=1, classes=(("cow", (0, 255, 0)),))
    with pytest.raises(SpecError, match="cow.*allowed: the training classes"):
        prepare(DataSpec(source="imagefolder", root=str(tmp_path / "train"),
                         val_root=str(tmp_path / "bad"), image_size=8), workers=0)


def _idx(path: Path, arr: np.ndarray) -> None:  # noqa: F821
    """Write an array in the IDX format torchvision's MNIST readers parse."""
    import struct

    code = 0x08  # unsigned byte
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I",
                                                                      *arr.shape)
    path.write_bytes(header + arr.astype("uint8").tobytes())


def test_torchvision_dataset_from_a_local_root(tmp_path: Path) -> None:
    import numpy as np

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28))).astype("uint8")
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    s = prepare(DataSpec(source="FashionMNIST", root=str(tmp_path), image_size=16,
                         val_fraction=0.2))
    # The source's own test split is the held-out test; val is carved from train, stratified.
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (50, 10, 20)
    assert s.classes[0] == "T-shirt/top" and s.train_x.shape[1:] == (3, 16, 16)
    assert torch.bincount(s.val_y).tolist() == [1] * 10
    # Pixel brightness follows the label, as written.
    means = s.test_x[:, 0].float().mean((1, 2))
    assert torch.all(means[1:].diff().sign()[s.test_y[1:].diff() > 0] > 0)


def test_missing_torchvision_dataset_says_where(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="CIFAR10 .*not found.*data.download"):
        prepare(DataSpec(source="CIFAR10", root=str(tmp_path)))


@pytest.mark.parametrize("setup, words", [
    (lambda p: None, "is not a folder"),
    (lambda p: (p.mkdir(), (p / "only").mkdir(), _png(p / "only" / "a.png", (1, 2, 3))), "at least 2"),
])
def test_imagefolder_errors(tmp_path: Path, setup, words: str) -> None:  # noqa: ANN001
    root = tmp_path / "images"
    setup(root)
    with pytest.raises(SpecError, match=words):
        load_dataset(DataSpec(source="imagefolder", root=str(root), image_size=8))


def test_relative_root_still_reads_from_another_working_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Trials run in their own folders (Ray's trial dirs, other nodes): paths must be absolute.
    _tree(tmp_path / "proj" / "img")
    monkeypatch.chdir(tmp_path / "proj")
    s = prepare(DataSpec(source="imagefolder", root="img", image_size=8, preload="never"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert s.train_x[0].float().max() > 200  # a real pixel, not the black stand-in


def test_prepare_each_reads_every_input_size_of_an_arch_choice_once() -> None:
    from raytune_ft.data import data_record, prepare_each, recorded_fingerprint
    from raytune_ft.spec.yaml_io import parse_spec

    # resnet18 without weights takes the digits' natural 32 px; mobilenet_v3_small with
    # torchvision weights takes their crop size, 224 px (read from the registry: nothing loaded)
    spec = parse_spec("name: t\nmodel:\n  arch: {space: choice, values: [resnet18, "
                      "mobilenet_v3_small, regnet_x_400mf]}\n  weights: {resnet18: none, "
                      "mobilenet_v3_small: IMAGENET1K_V1, regnet_x_400mf: none}\n",
                      file="t.yaml")
    by_size = prepare_each(spec)
    assert list(by_size) == [32, 224]  # in the order of the archs, each size once
    small, big = by_size[32], by_size[224]
    assert small.train_x.shape[-2:] == (32, 32) and big.train_x.shape[-2:] == (224, 224)
    # the same images in the same splits, only larger
    assert torch.equal(small.train_y, big.train_y) and torch.equal(small.test_y, big.test_y)
    record = data_record(by_size)
    assert record["by_image_size"]["224"] == big.fingerprint
    assert recorded_fingerprint(record, 224) == big.fingerprint
    assert recorded_fingerprint(record, 32) == small.fingerprint
    assert recorded_fingerprint(small.fingerprint, 32) == small.fingerprint  # one size: as ever
    assert data_record({32: small}) == small.fingerprint
