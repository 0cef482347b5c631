"""The command line: validate, and bad input → one paragraph, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_tiny_spec

from raytune_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_validate_prints_space_rungs_and_stages() -> None:
    res = CliRunner().invoke(main, ["validate", str(ROOT / "search_spaces" / "resnet.yaml")])
    assert res.exit_code == 0, res.output
    assert "momentum           uniform    [0.8, 0.99]  when optimizer=sgd" in res.output
    assert "epoch    1:   16 trial(s)" in res.output and "epoch    4:    4 trial(s)" in res.output
    assert "5. layer4" in res.output


@pytest.mark.parametrize("args, words", [
    (["--set", "search.lr.low=0"], "field 'search.lr.low'"),
    (["--set", "scheduler.reduction_factor=1"], "field 'scheduler.reduction_factor'"),
    (["--set", "model.arch=resnet19"], "Did you mean resnet18"),
])
def test_bad_input_exits_2_with_one_paragraph(args: list[str], words: str) -> None:
    res = CliRunner().invoke(main, ["validate", str(ROOT / "search_spaces" / "resnet.yaml"), *args])
    assert res.exit_code == 2
    assert words in res.output and "Traceback" not in res.output
    assert res.output.count("\n") == 1


@pytest.mark.parametrize("weights, words", [
    ("/nonexistent/w.pth", "weights file '/nonexistent/w.pth' not found"),
    ("IMAGENET9K", "has no weights 'IMAGENET9K'"),
])
def test_search_refuses_bad_weights_before_writing_anything(tmp_path: Path, weights: str,
                                                            words: str) -> None:
    spec_file = write_tiny_spec(tmp_path, weights=weights)
    res = CliRunner().invoke(main, ["search", str(spec_file)])
    assert res.exit_code == 2, res.output
    assert words in res.output and "line 2" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


def test_freeze_depth_beyond_the_stages_is_refused(tmp_path: Path) -> None:
    spec_file = write_tiny_spec(tmp_path)
    res = CliRunner().invoke(main, ["search", str(spec_file), "--set",
                                    "search.freeze_depth={space: int, low: 0, high: 9}"])
    assert res.exit_code == 2 and "allowed: 0..5" in res.output
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    spec_file = write_tiny_spec(tmp_path, weights="/nonexistent/w.pth")
    res = CliRunner().invoke(main, ["search", str(spec_file), "--debug"])
    assert res.exit_code == 2 and "Traceback" in res.output


def test_help_has_examples() -> None:
    res = CliRunner().invoke(main, ["search", "--help"])
    assert res.exit_code == 0 and "rtft search search_spaces/resnet.yaml" in res.output


def test_resume_needs_a_run_folder_with_its_spec(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["resume", str(tmp_path)])
    assert res.exit_code == 2 and "spec.yaml" in res.output and "file not found" in res.output


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml")))
def test_every_shipped_search_space_validates(name: str) -> None:
    # Weights and datasets need not exist to validate (nothing is downloaded or read); the GPU
    # examples are checked against the GPU machine they are written for.
    res = CliRunner().invoke(main, ["validate", str(ROOT / "search_spaces" / name),
                                    "--cluster-gpus", "1", "--cluster-cpus", "16"])
    assert res.exit_code == 0, res.output
    assert "stages (freeze_depth=k freezes the first k)" in res.output
    assert "image_size: " in res.output and "image_size: null" not in res.output
