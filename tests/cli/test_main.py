"""The command line (cli.py): validate (the search's dry run) and the trials that fit, and bad
input → one paragraph, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ROOT, fake_teacher, write_tiny_spec

from raytune_ft.cli.main import main


def test_validate_prints_space_rungs_and_stages(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # its results folders are relative: checked here, not made
    res = CliRunner().invoke(main, ["validate", str(ROOT / "search_spaces" / "resnet.yaml")])
    assert res.exit_code == 0, res.output
    assert "momentum           uniform    [0.8, 0.99]  when optimizer=sgd" in res.output
    # Two brackets taking turns (resnet.yaml): the first stops half its trials at epoch 2,
    # the second nothing before the last epoch.
    plan = res.output.split("ASHA rung plan", 1)[1].split("portfolio", 1)[0]
    assert "bracket 0:\n    epoch    2:    8 trial(s)\n    epoch    4:    4 trial(s)" in plan
    assert "bracket 1 (stops nothing before max_t):\n    epoch    4:    8 trial(s)" in plan
    assert "5. layer4" in res.output
    # The built-in portfolio as it will run, after the rung plan: one line per configuration.
    out = res.output.split("ASHA rung plan", 1)[1].split("\ndata:", 1)[0]
    assert "portfolio (builtin): 4 configuration(s), tried right after the baseline" in out
    lines = [x for x in out.splitlines() if x.startswith(("   1. ", "   4. "))]
    assert len(lines) == 2 and lines[0].startswith("   1. lr=") and "init=" in lines[0]


def test_validate_prints_each_brackets_rungs(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["validate", str(ROOT / "search_spaces" / "resnet.yaml"),
                                    "--set", "scheduler.brackets=2",
                                    "--set", "searcher.portfolio=none"])
    assert res.exit_code == 0, res.output
    assert ("ASHA rung plan, 2 brackets (trials take turns; epoch: trials expected to reach "
            "it):\n  bracket 0:\n    epoch    2:    8 trial(s)\n    epoch    4:    4 trial(s)\n"
            "  bracket 1 (stops nothing before max_t):\n    epoch    4:    8 trial(s)\n"
            "\ndata:") in res.output
    assert "portfolio (" not in res.output


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


@pytest.mark.parametrize("command", ["validate", "search"])
@pytest.mark.parametrize("weights, words", [
    ("/nonexistent/w.pth", "weights file '/nonexistent/w.pth' not found"),
    ("IMAGENET9K", "has no weights 'IMAGENET9K'"),
])
def test_bad_weights_are_refused_before_writing_anything(tmp_path: Path, command: str,
                                                         weights: str, words: str) -> None:
    spec_file = write_tiny_spec(tmp_path, weights=weights)
    res = CliRunner().invoke(main, [command, str(spec_file)])
    assert res.exit_code == 2, res.output
    assert words in res.output and "line 2" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("command", ["validate", "search"])
@pytest.mark.parametrize("knob, value, allowed", [
    ("freeze_depth", "{space: int, low: 0, high: 9}", "allowed: 0..5"),
    ("reinit_blocks", "{space: choice, values: [0, 11]}", "allowed: 0..10"),
])
def test_knobs_beyond_the_model_are_refused(tmp_path: Path, command: str, knob: str,
                                            value: str, allowed: str) -> None:
    spec_file = write_tiny_spec(tmp_path)
    res = CliRunner().invoke(main, [command, str(spec_file), "--set", f"search.{knob}={value}"])
    assert res.exit_code == 2 and allowed in res.output and f"'search.{knob}'" in res.output
    assert not (tmp_path / "runs").exists()


def test_validate_writes_nothing_and_says_what_it_checked(tmp_path: Path,
                                                          backbone_file: Path) -> None:
    spec_file = write_tiny_spec(tmp_path, weights=str(backbone_file))
    res = CliRunner().invoke(main, ["validate", str(spec_file)])
    assert res.exit_code == 0, res.output
    assert "data:    digits (built in): 10 classes" in res.output
    assert f"weights: file {backbone_file} (loaded as plain tensors: it fits resnet18)" \
        in res.output
    assert "reinit_blocks counts 10 blocks" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no runs/, models/


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


def _images(root: Path) -> Path:
    from PIL import Image

    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(root / c / "0.png")
    return root


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml")))
def test_every_shipped_search_space_validates(name: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Weights are checked by name (nothing is downloaded), the data where the spec points
    # (no image is read): the examples that read a dataset get a folder for it. The GPU
    # examples are checked against the GPU machine they are written for. Relative results
    # folders land in an empty working folder, where nothing may appear.
    monkeypatch.chdir(tmp_path)
    spec = ROOT / "search_spaces" / name
    sets = ["--set", f"data.root={_images(tmp_path / 'data')}"] \
        if "\n  root: " in spec.read_text() else []
    if "\n  teacher: " in spec.read_text():  # distill.yaml: a teacher promoted on its classes
        teacher = fake_teacher(tmp_path, [str(i) for i in range(10)])
        sets += ["--set", f"model.teacher={teacher}"]
    before = sorted(tmp_path.rglob("*"))
    res = CliRunner().invoke(main, ["validate", str(spec), "--cluster-gpus", "1",
                                    "--cluster-cpus", "16", *sets])
    assert res.exit_code == 0, res.output
    assert "stages (freeze_depth=k freezes the first k)" in res.output
    assert "image_size: " in res.output and "image_size: null" not in res.output
    assert sorted(tmp_path.rglob("*")) == before


def test_a_shipped_search_space_without_its_data_is_refused(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["validate", str(ROOT / "search_spaces" /
                                                    "resnet50_imagefolder.yaml"),
                                    "--set", f"data.root={tmp_path / 'none'}",
                                    "--cluster-gpus", "1", "--cluster-cpus", "16"])
    assert res.exit_code == 2 and "field 'data.root'" in res.output
    assert "is not a folder" in res.output



@pytest.mark.parametrize("args, expect", [
    (["--set", "run.resources.gpu=0.5", "--cluster-gpus", "4"], "8 trial(s) fit at once on a cluster of 4 GPU"),
    (["--cluster-gpus", "4", "--cluster-cpus", "3"], "3 trial(s) fit at once"),
])
def test_validate_prints_how_many_trials_fit(tmp_path: Path, args: list[str], expect: str) -> None:
    r = CliRunner().invoke(main, ["validate", str(write_tiny_spec(tmp_path)), *args])
    assert r.exit_code == 0, r.output
    assert expect in r.output and "2 run at a time" in r.output


def test_validate_refuses_a_cluster_too_small(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["validate", str(write_tiny_spec(tmp_path)), "--set",
                                  "run.resources.gpu=2", "--cluster-gpus", "1"])
    assert r.exit_code == 2 and "run.resources" in r.output and "pending forever" in r.output


# --------------------------------------------------------------------------------------------
# A finished run: rtft results with costs, rtft promote within bounds and --pareto.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as a search leaves it (spec.yaml, trials.json newer than Ray's state),
    with three made-up trials sharing one real checkpoint: their histories say how accurate
    and how fast each was."""
    import os

    from helpers import tiny_spec, train_tiny

    from raytune_ft.knobs import Hyperparams
    from raytune_ft.runs import TrialRecord, write_records
    from raytune_ft.spec.yaml_io import spec_to_yaml

    root = tmp_path_factory.mktemp("finished")
    spec = tiny_spec(root, extra="")
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"max_epochs": 1})})
    history = train_tiny(spec, Hyperparams(batch_size=32, augment="none"), root / "ckpt")
    run = root / "runs" / "tiny"
    (run / "tune").mkdir(parents=True)
    state = run / "tune" / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text("{}")
    os.utime(state, (1e9, 1e9))  # older than trials.json: the run is finished
    records = [TrialRecord(tid, {"lr": 0.005, "optimizer": "adamw", "freeze_depth": 1},
                           [{**history[-1], "val_acc": acc, "latency_b1_ms": ms,
                             "params": params}], str(root / "ckpt"))
               for tid, acc, ms, params in [("slow", 0.9, 9.0, 9_000_000),
                                            ("fast", 0.7, 1.0, 1_000_000),
                                            ("dominated", 0.6, 4.0, 2_000_000)]]
    (run / "spec.yaml").write_text(spec_to_yaml(spec))
    write_records(run, records)
    return run


def test_results_show_the_cost_columns(finished_run: Path) -> None:
    res = CliRunner().invoke(main, ["results", str(finished_run)])
    assert res.exit_code == 0, res.output
    head, _, first, second, third = res.output.splitlines()[1:6]
    assert head.split()[:9] == ["trial", "state", "epochs", "best", "val_acc", "Mparams",
                                "MFLOPs", "ms", "b1"]
    assert first.split()[:7] == ["slow", "completed", "1", "0.9000", "9", first.split()[5],
                                 "9"]
    assert second.split()[4] == "1" and third.split()[6] == "4"
    rows = json.loads(CliRunner().invoke(main, ["results", str(finished_run), "--json"]).output)
    assert [r["latency_b1_ms"] for r in rows] == [9.0, 1.0, 4.0]


def test_promote_within_a_bound_none_fits_and_pareto(finished_run: Path) -> None:
    spec_file = finished_run / "spec.yaml"
    text = spec_file.read_text()
    models = finished_run.parents[1] / "models" / "tiny"
    try:
        spec_file.write_text(text.replace("max_latency_ms: null", "max_latency_ms: 0.5"))
        res = CliRunner().invoke(main, ["promote", str(finished_run)])
        assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
        assert f"{spec_file}, line " in res.output and "'promote.max_latency_ms'" in res.output
        assert "no trial fits max_latency_ms 0.5 ms (the smallest latency_b1_ms is 1 ms)" \
            in res.output
        assert not models.exists()  # nothing written

        spec_file.write_text(text.replace("max_latency_ms: null", "max_latency_ms: 5"))
        res = CliRunner().invoke(main, ["promote", str(finished_run)])
        assert res.exit_code == 0, res.output
        assert "promoted trial fast (resnet18, rank 1)" in res.output
    finally:
        spec_file.write_text(text)
    res = CliRunner().invoke(main, ["promote", str(finished_run), "--pareto"])
    assert res.exit_code == 0, res.output
    assert "Pareto point 1/2, latency_b1_ms 1" in res.output
    assert "promoted trial slow (resnet18, Pareto point 2/2" in res.output
    picked = [json.loads((models / v / "metrics.json").read_text())["trial_id"]
              for v in ("v1", "v2", "v3")]
    assert picked == ["fast", "fast", "slow"] and not (models / "v4").exists()


def test_validate_lists_a_searched_arch_first(tmp_path: Path) -> None:
    spec_file = write_tiny_spec(tmp_path)
    text = spec_file.read_text().replace(
        "model: {arch: resnet18, weights: none}",
        "model: {arch: {space: choice, values: [resnet18, mobilenet_v3_small]}, weights: none}")
    spec_file.write_text(text)
    res = CliRunner().invoke(main, ["validate", str(spec_file)])
    assert res.exit_code == 0, res.output
    space = res.output.split("search space:\n")[1].splitlines()
    assert space[0].split() == ["arch", "choice", "{resnet18,", "mobilenet_v3_small}"]
    assert space[1].split()[:2] == ["lr", "loguniform"]
