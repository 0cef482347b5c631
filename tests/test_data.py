"""Data: stratified fixed-seed splits, the built-in sets, ImageFolder with a corrupt file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytune_ft.data import augment_batch, load_dataset, make_splits, normalize, prepare
from raytune_ft.spec import DataSpec, SpecError


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


def test_imagefolder_reads_pngs_and_skips_a_corrupt_file(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(6):
            _png(tmp_path / cls / f"{i}.png", colour)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = load_dataset(DataSpec(source="imagefolder", root=str(tmp_path), image_size=8))
    assert ds.classes == ["cat", "dog"]
    assert ds.images.shape == (12, 3, 8, 8)
    assert ds.images[0, 0].float().mean() > 200 and ds.images[-1, 2].float().mean() > 200
    assert "broken.png" in caplog.text


@pytest.mark.parametrize("setup, words", [
    (lambda p: None, "is not a folder"),
    (lambda p: (p.mkdir(), (p / "only").mkdir(), _png(p / "only" / "a.png", (1, 2, 3))), "at least 2"),
])
def test_imagefolder_errors(tmp_path: Path, setup, words: str) -> None:  # noqa: ANN001
    root = tmp_path / "images"
    setup(root)
    with pytest.raises(SpecError, match=words):
        load_dataset(DataSpec(source="imagefolder", root=str(root), image_size=8))
