"""`rtft report` (report.py) on a made-up run folder: the accuracy/latency plot with its Pareto
front, the cost columns, the architectures of a choice spec; a run without costs as before."""

from __future__ import annotations

from pathlib import Path

from raytune_ft.report import write_report
from raytune_ft.runs import TrialRecord, write_records
from raytune_ft.spec.yaml_io import parse_spec, spec_to_yaml

SPEC = """\
name: pick
model: {{arch: {{space: choice, values: [resnet18, mobilenet_v3_small]}}, weights: none}}
data: {{source: digits, image_size: 16}}
train: {{max_epochs: 2}}
search:
  lr: {{space: loguniform, low: 1.0e-3, high: 1.0e-2}}
promote: {{dir: {root}/models, max_latency_ms: 4}}
"""


def trial(tid: str, arch: str, accs: list[float], ms: float | None) -> TrialRecord:
    hist = [{"epoch": i + 1, "val_acc": a, "val_loss": 1 - a, "timestamp": 100.0 + i}
            for i, a in enumerate(accs)]
    if ms is not None:
        for h in hist:
            h.update(params=int(ms * 1e6), flops=ms * 1e8, latency_b1_ms=ms,
                     latency_b32_ms=10 * ms, epoch_s=2.0)
    return TrialRecord(tid, {"arch": arch, "lr": 0.003}, hist, f"/ckpt/{tid}")


def _run(tmp_path: Path, records: list[TrialRecord]) -> Path:
    run = tmp_path / "runs" / "pick"
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(spec_to_yaml(parse_spec(SPEC.format(root=tmp_path),
                                                           file="pick.yaml")))
    write_records(run, records)
    return run


def test_the_report_plots_accuracy_against_latency_with_the_front(tmp_path: Path) -> None:
    run = _run(tmp_path, [trial("r1", "resnet18", [0.7, 0.95], 6.0),
                          trial("m1", "mobilenet_v3_small", [0.6, 0.85], 1.5),
                          trial("m2", "mobilenet_v3_small", [0.5, 0.80], 2.0),  # dominated
                          trial("early", "resnet18", [0.99], 0.5)])  # stopped at epoch 1
    page = write_report(run).read_text()
    assert (run / "report" / "cost.png").stat().st_size > 0
    assert '<img src="cost.png"' in page
    # The front `rtft promote --pareto` takes: early is not comparable (epoch 1), and r1 is
    # beyond the spec's max_latency_ms of 4 ms.
    assert "Pareto front" in page and ": m1.</p>" in page
    assert "pick: resnet18, mobilenet_v3_small on digits" in page
    for col in ("<th>Mparams</th>", "<th>MFLOPs</th>", "<th>ms b1</th>", "<th>s/epoch</th>",
                "<th>arch</th>"):
        assert col in page
    assert "<td>mobilenet_v3_small</td>" in page


def test_a_run_without_costs_reports_as_before(tmp_path: Path) -> None:
    run = _run(tmp_path, [trial("a", "resnet18", [0.5, 0.6], None)])
    page = write_report(run).read_text()
    assert not (run / "report" / "cost.png").exists() and "cost.png" not in page
    assert "Mparams" not in page and (run / "report" / "curves.png").exists()
