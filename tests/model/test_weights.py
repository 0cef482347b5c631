"""model.weights values (weights.py): one classifier for every kind of value."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_weights_values_classified_in_one_place(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from raytune_ft.model.weights import classify, weights_meta

    monkeypatch.chdir(tmp_path)
    (tmp_path / "promoted").mkdir()
    (tmp_path / "bare").write_bytes(b"")  # a bare word naming a file here is that file
    kinds = {v: classify(v).kind for v in (
        "none", "rtft:mnist", "DEFAULT", "IMAGENET1K_V1", "w.pth", "sub/w.safetensors",
        "promoted", "bare", "s3://bucket/w.pth", "x" * 5000, "a\0b", "~nobody-here",
        "~nobody-here/w.pth")}
    assert kinds == {
        "none": "none", "rtft:mnist": "recipe", "DEFAULT": "torchvision",
        "IMAGENET1K_V1": "torchvision", "w.pth": "file", "sub/w.safetensors": "file",
        "promoted": "promoted", "bare": "file", "s3://bucket/w.pth": "uri",
        "x" * 5000: "torchvision", "a\0b": "torchvision", "~nobody-here": "torchvision",
        "~nobody-here/w.pth": "file"}  # odd strings never raise: the spec loader asks too
    assert classify("rtft:mnist").recipe == "mnist"
    assert weights_meta("resnet18", "DEFAULT")["crop_size"] == 224
    assert weights_meta("resnet18", "bare") is None and weights_meta("nosuch", "DEFAULT") is None
