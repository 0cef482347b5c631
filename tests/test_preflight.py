"""preflight: the dry run `rtft validate` prints and `rtft search` makes first.

It refuses what a search would refuse (weights, data folders, ranges past the model's stages
and blocks, results folders, resources), writes nothing, downloads nothing, pretrains nothing.
(check_source, the data check it makes: test_sources.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_spec

from raytune_ft import preflight
from raytune_ft.errors import SpecError, UserError
from raytune_ft.model.build import recipe_path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TWO_CPUS = preflight.Machines({"CPU": 2.0, "GPU": 0.0}, "two CPUs")


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def test_dry_run_describes_the_model_data_and_fit(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    plan = preflight.dry_run(spec, TWO_CPUS)
    assert [name for name, _ in plan.model.stages] == ["stem", "layer1", "layer2", "layer3",
                                                        "layer4"]
    assert plan.model.blocks == 10 and plan.model.head_path == "fc"
    assert plan.model.total_params == 11_181_642  # resnet18 with a 10-class head
    assert plan.data == "digits (built in): 10 classes"
    assert plan.weights.startswith("none")
    assert plan.fit == preflight.Fit("two CPUs", fits=2, at_once=2)
    assert preflight.dry_run(spec, None).fit is None  # a cluster: checked once joined


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "new")  # storage and promote.dir under new/
    preflight.dry_run(spec, TWO_CPUS)
    assert not (tmp_path / "new").exists() and _files(tmp_path) == []


def test_a_trial_too_big_for_the_machines_is_refused(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    one_cpu = preflight.Machines({"CPU": 0.5, "GPU": 0.0}, "half a CPU")
    with pytest.raises(UserError, match="half a CPU has 0.5 CPU") as e:
        preflight.dry_run(spec, one_cpu)
    assert e.value.field == "run.resources"


@pytest.mark.parametrize("search, words", [
    ("freeze_depth: {space: int, low: 0, high: 50}", "freeze_depth 50 (high)"),
    ("freeze_depth: {space: choice, values: [0, 6]}", "freeze_depth 6 (values.1)"),
    ("freeze_depth: 6", "freeze_depth 6 is more"),
    ("reinit_blocks: {space: int, low: 0, high: 11}", "reinit_blocks 11 (high)"),
    ("reinit_blocks: 11", "reinit_blocks 11 is more"),
])
def test_ranges_past_the_stages_or_blocks_are_refused(tmp_path: Path, search: str,
                                                      words: str) -> None:
    knob = search.split(":")[0]
    with pytest.raises(UserError, match=r"allowed: 0\.\.(5|10)$") as e:
        preflight.dry_run(_with_search(tmp_path, search), TWO_CPUS)
    assert words in str(e.value) and e.value.field == f"search.{knob}"
    assert ("5 stages (stem, layer1, layer2, layer3, layer4)" if knob == "freeze_depth"
            else "10 re-initialisable blocks in its 5 stages") in str(e.value)


@pytest.mark.parametrize("search", ["freeze_depth: {space: int, low: 0, high: 5}",
                                    "reinit_blocks: {space: choice, values: [0, 10]}"])
def test_ranges_up_to_the_count_pass(tmp_path: Path, search: str) -> None:
    preflight.dry_run(_with_search(tmp_path, search), TWO_CPUS)


def _with_search(tmp_path: Path, line: str):  # noqa: ANN202 - a Spec
    """The tiny spec with one more search parameter (its search section ends the text)."""
    from helpers import TINY_SPEC

    from raytune_ft.spec.yaml_io import parse_spec

    text = TINY_SPEC.format(root=tmp_path, n=4, weights="none")
    head, _, tail = text.partition("searcher:")
    head = "\n".join(ln for ln in head.splitlines() if not ln.startswith("  freeze_depth:"))
    return parse_spec(f"{head}\n  {line}\nsearcher:{tail}", file="tiny.yaml")


def test_a_factory_model_counts_its_own_stages(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    from raytune_ft.spec.yaml_io import parse_spec

    base = ("name: f\nmodel: {factory: 'rtft_fixture_models:tiny_net', weights: %s}\n"
            f"run: {{storage_path: {tmp_path}/runs}}\npromote: {{dir: {tmp_path}/m}}\n")
    spec = parse_spec(base % "none" + "search:\n  freeze_depth: {space: int, low: 0, high: 4}\n")
    with pytest.raises(UserError, match=r"3 stages \(stem, body, pool\); allowed: 0\.\.3"):
        preflight.dry_run(spec, TWO_CPUS)
    # A torchvision weights name means nothing to a factory network: refused by name.
    with pytest.raises(UserError, match="model.factory network takes weights from a file"):
        preflight.dry_run(parse_spec(base % "DEFAULT"), TWO_CPUS)


# -- weights -------------------------------------------------------------------------------
def test_a_weights_file_is_loaded_and_fitted(tmp_path: Path, backbone_file: Path) -> None:
    plan = preflight.dry_run(tiny_spec(tmp_path, weights=str(backbone_file)), TWO_CPUS)
    assert plan.weights == f"file {backbone_file} (loaded as plain tensors: it fits resnet18)"
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match="do not fit this architecture"):
        preflight.dry_run(tiny_spec(tmp_path, weights=str(wrong)), TWO_CPUS)
    with pytest.raises(UserError, match="not found") as e:
        preflight.dry_run(tiny_spec(tmp_path, weights=str(tmp_path / "nope.pth")), TWO_CPUS)
    assert e.value.field == "model.weights"


def test_torchvision_weights_are_checked_by_name_and_loaded_by_search_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models._api as api

    fetched: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> dict:
        fetched.append(url)
        raise OSError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    plan = preflight.dry_run(tiny_spec(tmp_path, weights="IMAGENET1K_V1"), TWO_CPUS)
    assert "torchvision resnet18 IMAGENET1K_V1" in plan.weights and fetched == []
    with pytest.raises(UserError, match="resnet18 has no weights 'IMAGENET1K_V2'") as e:
        preflight.dry_run(tiny_spec(tmp_path, weights="IMAGENET1K_V2"), TWO_CPUS)
    assert "allowed: DEFAULT, IMAGENET1K_V1," in str(e.value)  # from the registry snapshot
    # The search loads them once in its driver: without network, refused before Ray starts.
    with pytest.raises(UserError, match="cannot get resnet18 weights IMAGENET1K_V1"):
        preflight.check_pretrained(tiny_spec(tmp_path, weights="IMAGENET1K_V1"), 10)
    assert len(fetched) == 1


def test_an_rtft_recipe_is_named_never_pretrained(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTFT_CACHE", str(tmp_path / "cache"))  # empty, whatever ran before
    spec = tiny_spec(tmp_path, weights="rtft:mnist")
    plan = preflight.dry_run(spec, TWO_CPUS)
    cached = recipe_path("mnist", "resnet18", 16)
    assert "not built yet" in plan.weights and str(cached) in plan.weights
    assert not (tmp_path / "cache").exists()
    with pytest.raises(UserError, match="unknown rtft backbone 'rtft:imagenet'"):
        preflight.dry_run(tiny_spec(tmp_path, weights="rtft:imagenet"), TWO_CPUS)


# -- where results go, where trials run ------------------------------------------------------
def test_an_unwritable_folder_keeps_its_cause(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a file")
    with pytest.raises(UserError, match="is a file"):
        preflight.dry_run(tiny_spec(tmp_path / "f"), TWO_CPUS)
    with pytest.raises(UserError, match="not writable") as e:
        preflight.check_writable("/sys/rtft-test", "run.storage_path")
    assert isinstance(e.value.__cause__, OSError)


def test_storage_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raytune_ft import preflight

    preflight.check_writable(str(tmp_path / "new" / "runs"), "run.storage_path")  # created later
    preflight.check_writable("s3://bucket/runs", "run.storage_path")  # URIs: storage's business
    assert list(tmp_path.iterdir()) == []  # the probe left nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpecError, match="is a file") as info:
        preflight.check_writable(str(tmp_path / "f" / "runs"), "promote.dir")
    assert info.value.field == "promote.dir"
    with pytest.raises(SpecError, match="not writable"):
        preflight.check_writable("/sys/rtft-test", "run.storage_path")

    class Usage:
        free = 5 * 2**20

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(SpecError, match=r"the disk is full \(5 MB free"):
        preflight.check_writable(str(tmp_path), "run.storage_path")


@pytest.mark.parametrize("gpus, cpus, expect", [
    (4.0, None, ({"CPU": 8.0, "GPU": 4.0}, "a cluster of 4 GPU")),  # 0.5 GPU, 1 CPU a trial
    (4.0, 3.0, ({"CPU": 3.0, "GPU": 4.0}, "a cluster of 4 GPU, 3 CPU")),
    (None, 6.0, ({"CPU": 6.0, "GPU": 0.0}, "a cluster of 6 CPU")),
])
def test_machines_of_a_given_size(tmp_path: Path, gpus: float | None, cpus: float | None,
                                  expect: tuple) -> None:
    spec = tiny_spec(tmp_path)
    spec = spec.model_copy(update={"run": spec.run.model_copy(update={
        "resources": spec.run.resources.model_copy(update={"gpu": 0.5})})})
    on = preflight.machines(spec, gpus=gpus, cpus=cpus)
    assert (on.resources, on.where) == expect


def test_machines_default_to_this_one(tmp_path: Path) -> None:
    on = preflight.machines(tiny_spec(tmp_path))
    assert on.resources == preflight.local_resources()
    assert on.where.startswith("this machine (")
    with pytest.raises(UserError, match="--cluster-gpus alone says nothing"):
        preflight.machines(tiny_spec(tmp_path), gpus=2.0)


def test_an_existing_run_is_refused_without_resume(tmp_path: Path) -> None:
    dry_run = preflight.dry_run
    spec = tiny_spec(tmp_path)
    dry_run(spec, None)  # a new run: fine
    (tmp_path / "runs" / "tiny" / "tune").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "tune" / "tuner.pkl").write_bytes(b"")
    with pytest.raises(UserError, match="already exists") as e:
        dry_run(spec, None)
    assert e.value.field == "name"
    dry_run(spec, None, resume=True)  # what `rtft search --resume` checks


# -- a choice of architectures: every one is checked, as the spec of that one alone ----------
def _choice_spec(tmp_path: Path, weights: str = "none", search: str = "",  # noqa: ANN202
                 archs: str = "mobilenet_v3_small, resnet18"):
    from raytune_ft.spec.yaml_io import parse_spec

    return parse_spec(
        f"name: c\nmodel:\n  arch: {{space: choice, values: [{archs}]}}\n"
        f"  weights: {weights}\ndata: {{source: digits, image_size: 16, train_limit: 100}}\n"
        f"search:\n  lr: {{space: loguniform, low: 1.0e-3, high: 1.0e-2}}\n{search}"
        f"run: {{storage_path: {tmp_path}/runs}}\npromote: {{dir: {tmp_path}/models}}\n",
        file="c.yaml")


def test_dry_run_shows_every_arch_of_a_choice(tmp_path: Path) -> None:
    plan = preflight.dry_run(_choice_spec(tmp_path), TWO_CPUS)
    assert [m.arch for m in plan.models] == ["mobilenet_v3_small", "resnet18"]
    assert plan.model is plan.models[0] and len(plan.models[0].stages) == 13
    assert plan.models[1].total_params == 11_181_642
    assert plan.weights.splitlines() == [
        "mobilenet_v3_small: none (the backbone starts from random weights)",
        "         resnet18: none (the backbone starts from random weights)"]
    tables = plan.tables()
    assert "mobilenet_v3_small stages" in tables and "resnet18 stages" in tables
    assert _files(tmp_path) == []


@pytest.mark.parametrize("search, field, words", [
    # Fits mobilenet_v3_small's 13 stages; resnet18, the second, has 5.
    ("  freeze_depth: {space: int, low: 0, high: 8}\n", "search.freeze_depth",
     "freeze_depth 8 (high) is more than resnet18 has: resnet18 has 5 stages (stem, layer1, "
     "layer2, layer3, layer4); allowed: 0..5 for resnet18 (gate freeze_depth with when: "
     "{arch: [...]}, or use freeze_fraction"),
    ("  reinit_blocks: {space: choice, values: [0, 12]}\n", "search.reinit_blocks",
     "reinit_blocks 12 (values.1) is more than resnet18 has"),
])
def test_a_range_that_does_not_fit_one_arch_is_refused_naming_it(
        tmp_path: Path, search: str, field: str, words: str) -> None:
    with pytest.raises(UserError) as e:
        preflight.dry_run(_choice_spec(tmp_path, search=search), TWO_CPUS)
    assert e.value.field == field and words in str(e.value), str(e.value)


def test_a_range_gated_to_the_arch_it_fits_is_accepted(tmp_path: Path) -> None:
    gated = "  freeze_depth: {space: int, low: 0, high: 8, when: {arch: mobilenet_v3_small}}\n"
    preflight.dry_run(_choice_spec(tmp_path, search=gated), TWO_CPUS)
    fraction = "  freeze_fraction: {space: uniform, low: 0, high: 1}\n"
    preflight.dry_run(_choice_spec(tmp_path, search=fraction), TWO_CPUS)


@pytest.mark.parametrize("archs, weights, field", [
    # mobilenet_v3_large has IMAGENET1K_V2, resnet18 only V1.
    ("mobilenet_v3_large, resnet18", "IMAGENET1K_V2", "model.weights"),
    ("mobilenet_v3_small, resnet18", "{mobilenet_v3_small: DEFAULT, resnet18: IMAGENET1K_V2}",
     "model.weights.resnet18"),
])
def test_weights_one_arch_lacks_are_refused_naming_it(tmp_path: Path, archs: str, weights: str,
                                                      field: str) -> None:
    with pytest.raises(UserError) as e:
        preflight.dry_run(_choice_spec(tmp_path, weights=weights, archs=archs), TWO_CPUS)
    assert e.value.field == field
    assert str(e.value).endswith("resnet18 has no weights 'IMAGENET1K_V2'; allowed: DEFAULT, "
                                 "IMAGENET1K_V1, a file path, rtft:mnist or none")


def test_check_pretrained_loads_every_arch(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setenv("RTFT_CACHE", str(tmp_path / "cache"))
    spec = _choice_spec(tmp_path, weights="rtft:mnist")

    def build(arch: str) -> None:  # what `rtft pretrain` leaves: a state dict, its own head
        path = recipe_path("mnist", arch, 16)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.get_model(arch, num_classes=10).state_dict(), path)

    build("mobilenet_v3_small")
    with pytest.raises(UserError, match="rtft:mnist for resnet18 at 16px is not built yet") as e:
        preflight.check_pretrained(spec, 10)
    assert e.value.field == "model.weights"
    build("resnet18")
    preflight.check_pretrained(spec, 10)
