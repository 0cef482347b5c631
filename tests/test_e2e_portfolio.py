"""A real search with a portfolio and hedged ASHA (two brackets): the portfolio's configurations
run right after the baseline and to the last epoch, trials take turns between the brackets,
the second bracket stops nothing, and a configuration that fails to train is a FAIL like any
trial while the search goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import write_tiny_spec

from raytune_ft.cli.main import main

pytestmark = pytest.mark.slow

PORTFOLIO = [
    {"lr": 0.005, "optimizer": "sgd", "momentum": 0.9, "freeze_depth": 2, "warmup_epochs": 0.0},
    # warmup_epochs 5 is a valid knob value that fails at run time (longer than the 2 epochs
    # of training): a portfolio entry that fails to train
    {"lr": 0.002, "optimizer": "adamw", "freeze_depth": 1, "warmup_epochs": 5.0},
]


def test_portfolio_then_search_with_two_brackets(ray_session, tmp_path: Path,  # noqa: ANN001
                                                 backbone_file: Path) -> None:
    pf = tmp_path / "portfolio.json"
    pf.write_text(json.dumps({"about": "test", "configs": PORTFOLIO}))
    spec_file = write_tiny_spec(tmp_path, weights=str(backbone_file))
    sets = ["--set", f"searcher.portfolio={pf}", "--set", "scheduler.brackets=2",
            "--set", "run.num_samples=6", "--set", "searcher.sampler=random",
            "--set", "search.warmup_epochs={space: choice, values: [0.0, 5.0]}"]
    res = CliRunner().invoke(main, ["validate", str(spec_file), *sets])
    assert res.exit_code == 0, res.output
    assert "portfolio (" in res.output and "lr=0.005" in res.output
    res = CliRunner().invoke(main, ["search", str(spec_file), *sets], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "portfolio (" in res.output and "configuration(s) next" in res.output
    run = tmp_path / "runs" / "tiny"
    trials = json.loads((run / "trials.json").read_text())
    assert len(trials) == 6
    log = [json.loads(x) for x in (run / "asha_decisions.jsonl").read_text().splitlines()]
    added = [d for d in log if d["action"] == "ADD"]
    assert [d["bracket"] for d in added] == [0, 1, 0, 1, 0, 1]  # trials take turns
    order = [d["trial"] for d in added]
    by_id = {t["trial_id"]: t for t in trials}
    # The baseline first, then the portfolio's two configurations in their order.
    first = [by_id[t]["params"] for t in order[:3]]
    assert first[1]["lr"] == pytest.approx(0.005) and first[1]["freeze_depth"] == 2
    assert first[2]["warmup_epochs"] == 5.0
    failed = by_id[order[2]]
    assert failed["error"] and "warmup_epochs (5.0) must be below" in failed["error"]
    # Protected: the baseline and the first portfolio configuration train to the last epoch.
    assert all(max(h["epoch"] for h in by_id[t]["history"]) == 2 for t in order[:2]), [(by_id[t]["params"], by_id[t]["error"]) for t in order[:3]]
    # The second bracket stops nothing before max_t (2): its rung is at max_t.
    second = {d["trial"] for d in added if d["bracket"] == 1}
    assert not any(d["action"] == "STOP" and d["trial"] in second and d["epoch"] < 2
                   for d in log)
