"""Data sources (sources.py): check_source, the cheap check validate makes, without reading
images, in the words the search uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytune_ft.errors import UserError
from raytune_ft.sources import check_source
from raytune_ft.spec.schema import DataSpec


def _tree(root: Path, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / c / "0.png")
    return root


def test_check_source_counts_class_folders_without_reading_images(tmp_path: Path) -> None:
    root = _tree(tmp_path / "train", ("a", "b", "c"))
    (root / "a" / "1.png").write_bytes(b"not a png at all")  # not opened: search skips it
    assert check_source(DataSpec(source="imagefolder", root=str(root))) == 3
    assert check_source(DataSpec(source="digits")) == 10
    _tree(tmp_path / "val", ("a", "b"))  # a class may be missing from val
    assert check_source(DataSpec(source="imagefolder", root=str(root),
                                 val_root=str(tmp_path / "val"))) == 3


@pytest.mark.parametrize("make, field, words", [
    (lambda r: None, "data.root", "is not a folder"),
    (lambda r: (r.mkdir(), (r / "x.png").write_bytes(b"")), "data.root", "0 class folder(s)"),
    (lambda r: _tree(r, ("only",)), "data.root", "1 class folder(s)"),
    (lambda r: (_tree(r), (r / "eel").mkdir()), "data.root", "class folder(s) eel hold no"),
    (lambda r: (_tree(r), _tree(r.parent / "val", ("cat", "cow"))), "data.val_root",
     "class folder(s) cow that data.root does not"),
])
def test_check_source_refuses_a_bad_image_folder(tmp_path: Path, make, field: str,  # noqa: ANN001
                                                 words: str) -> None:
    root = tmp_path / "train"
    make(root)
    val = str(tmp_path / "val") if field == "data.val_root" else None
    with pytest.raises(UserError) as e:
        check_source(DataSpec(source="imagefolder", root=str(root), val_root=val))
    assert words in str(e.value) and e.value.field == field


def test_the_search_refuses_a_bad_folder_in_the_same_words(tmp_path: Path) -> None:
    from raytune_ft.data import prepare

    _tree(tmp_path / "train", ("only",))
    d = DataSpec(source="imagefolder", root=str(tmp_path / "train"))
    with pytest.raises(UserError) as light:
        check_source(d)
    with pytest.raises(UserError) as full:
        prepare(d)
    assert str(light.value) == str(full.value)


def test_check_source_of_a_torchvision_dataset(tmp_path: Path) -> None:
    assert check_source(DataSpec(source="CIFAR10", root=str(tmp_path))) is None
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match="torchvision's CIFAR10 files"):
        check_source(DataSpec(source="CIFAR10", root=missing))
    assert check_source(DataSpec(source="CIFAR10", root=missing, download=True)) is None
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):  # downloading cannot fix that
        check_source(DataSpec(source="CIFAR10", root=str(tmp_path / "a_file"), download=True))
    assert not (tmp_path / "nope").exists()
