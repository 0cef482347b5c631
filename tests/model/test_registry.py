"""The shipped snapshot of torchvision's registry is the installed torchvision's registry, so
using it (to keep spec checks free of a 3 s import) can never change what a check decides."""

from __future__ import annotations

import json
from importlib import metadata

from raytune_ft.model import registry as tv_registry


def test_snapshot_is_the_installed_torchvision_registry() -> None:
    snap = json.loads(tv_registry.SNAPSHOT.read_text())
    live = tv_registry.read_live()
    assert snap["torchvision"] == metadata.version("torchvision").split("+")[0], (
        "refresh: python -m raytune_ft.model.registry > raytune_ft/model/registry.json")
    assert snap == json.loads(json.dumps(live)), (
        "refresh: python -m raytune_ft.model.registry > raytune_ft/model/registry.json")


def test_lookups_match_torchvision() -> None:
    from torchvision.models import get_model_weights

    w = get_model_weights("efficientnet_b0").DEFAULT
    meta = tv_registry.weights_meta("efficientnet_b0", "DEFAULT")
    assert meta["name"] == f"efficientnet_b0.{w.name}"
    assert meta["crop_size"] == w.transforms().crop_size[0]
    assert tv_registry.weights_names("resnet50")[:1] == ["DEFAULT"]
    assert "IMAGENET1K_V2" in tv_registry.weights_names("resnet50")
    assert tv_registry.weights_meta("resnet18", "IMAGENET1K_V2") is None
    assert tv_registry.weights_meta("nosuch", "DEFAULT") is None


def test_another_torchvision_is_read_live(monkeypatch) -> None:
    tv_registry.registry.cache_clear()
    monkeypatch.setattr(tv_registry, "_installed_version", lambda: "0.0.1")
    try:
        assert "resnet18" in tv_registry.archs()  # read live, not from the snapshot
        assert tv_registry.registry()["torchvision"] != "0.0.1"
    finally:
        tv_registry.registry.cache_clear()
