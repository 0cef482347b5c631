"""A real Ray Tune search end to end (embedded Ray, real training on tiny data), then the
results, promote and report commands on its run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import write_tiny_spec

from raytune_ft.cli.main import main
from raytune_ft.data import prepare
from raytune_ft.promote import load_promoted
from raytune_ft.spec.yaml_io import load_spec
from raytune_ft.train import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory: pytest.TempPathFactory, backbone_file: Path):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("search")
    spec_file = write_tiny_spec(root, n=4, weights=str(backbone_file))
    result = CliRunner().invoke(main, ["search", str(spec_file)], catch_exceptions=False)
    return root, spec_file, result


def test_search_runs_trains_and_promotes(finished_run) -> None:  # noqa: ANN001
    root, spec_file, result = finished_run
    assert result.exit_code == 0, result.output
    out = result.output
    assert "results: " in out and "tensorboard --logdir" in out and "promoted model:" in out
    run_dir = root / "runs" / "tiny"
    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials) == 4
    for t in trials:
        assert ("momentum" in t["params"]) == (t["params"]["optimizer"] == "sgd")
        assert 1 <= max(h["epoch"] for h in t["history"]) <= 2
    assert load_spec(run_dir / "spec.yaml") == load_spec(spec_file)
    assert json.loads((run_dir / "data.json").read_text())["train"] == 160


def test_tensorboard_event_files_per_trial_with_hparams(finished_run) -> None:  # noqa: ANN001
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _ = finished_run
    trial_dirs = sorted((root / "runs" / "tiny" / "tune").glob("trial_*"))
    assert len(trial_dirs) == 4
    for d in trial_dirs:
        ea = EventAccumulator(str(d))
        ea.Reload()
        assert "ray/tune/val_acc" in ea.Tags()["scalars"]
        assert "ray/tune/latency_b1_ms" in ea.Tags()["scalars"]  # cost, through Ray's logger
        assert ea.Scalars("ray/tune/val_acc")[0].step == 1
        hp_tags = ea.PluginTagToContent("hparams")
        assert hp_tags, f"no HParams summary in {d}"


def test_promoted_model_reloads_with_the_same_test_accuracy(finished_run) -> None:  # noqa: ANN001
    root, spec_file, _ = finished_run
    [folder] = (root / "models" / "tiny").glob("v1")
    metrics = json.loads((folder / "metrics.json").read_text())
    loaded = load_promoted(folder)
    data = prepare(load_spec(spec_file).data)
    _, acc = evaluate(loaded.model, data.test_x, data.test_y)
    assert acc == pytest.approx(metrics["test"]["acc"])
    assert metrics["epochs"] == 2  # only trials that reached the top rung are eligible


def test_results_and_promote_commands_read_the_run_back(finished_run) -> None:  # noqa: ANN001
    root, _, _ = finished_run
    run_dir = root / "runs" / "tiny"
    res = CliRunner().invoke(main, ["results", str(run_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("4 trials:")
    rows = [ln for ln in res.output.splitlines()[3:] if ln.strip()]
    assert len(rows) == 4
    best = [float(r.split()[3]) for r in rows]
    assert best == sorted(best, reverse=True)  # sorted by best-so-far metric
    res = CliRunner().invoke(main, ["results", str(run_dir), "--json"], catch_exceptions=False)
    rows = json.loads(res.output)
    assert [round(r["best_val_acc"], 4) for r in rows] == best and {"lr", "state"} <= set(rows[0])
    res = CliRunner().invoke(main, ["results", str(run_dir), "--csv"], catch_exceptions=False)
    assert res.output.splitlines()[0].startswith(
        "trial,state,epochs,best_val_acc,params,flops,latency_b1_ms,latency_b32_ms,epoch_s,lr")
    assert len(res.output.splitlines()) == 5
    res = CliRunner().invoke(main, ["promote", str(run_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (root / "models" / "tiny" / "v2" / "metrics.json").exists()


def test_report_writes_html_with_real_plots(finished_run) -> None:  # noqa: ANN001
    import re

    root, _, _ = finished_run
    run_dir = root / "runs" / "tiny"
    res = CliRunner().invoke(main, ["report", str(run_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    page = (run_dir / "report" / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert set(images) == {"curves.png", "best_vs_time.png", "importance.png", "parallel.png",
                           "cost.png"}  # every trial recorded its cost: accuracy vs latency
    for name in images:
        data = (run_dir / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "held-out test accuracy" in page  # the promoted model is shown
    assert page.count("<tr>") == 5  # header + 4 trials
