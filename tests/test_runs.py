"""A run folder without Ray (runs.py): how trials rank and are chosen (made-up trials), their
states, and which trials.json is current."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raytune_ft.runs import TrialRecord, trial_state
from raytune_ft.selection import choose


def rec(tid: str, accs: list[float], *, ckpt: bool = True, diverged: bool = False,
        error: str | None = None) -> TrialRecord:
    hist = [{"epoch": i + 1, "val_acc": a, "val_loss": 1 - a} for i, a in enumerate(accs)]
    if diverged:
        hist.append({"epoch": len(accs) + 1, "val_acc": 0.0, "val_loss": 1e9, "diverged": True})
    return TrialRecord(tid, {"lr": 0.1}, hist, f"/ckpt/{tid}" if ckpt else None, error)


@pytest.mark.parametrize("records, expect", [
    # A one-epoch fluke does not beat trials that trained to the top rung.
    ([rec("fluke", [0.99]), rec("full", [0.5, 0.8, 0.9, 0.91]), rec("mid", [0.6, 0.95])], ["full"]),
    # Best-so-far, not last: b peaked at 0.95 then dropped.
    ([rec("a", [0.5, 0.9]), rec("b", [0.95, 0.85])], ["b", "a"]),
    # Diverged and checkpoint-less trials are never promoted.
    ([rec("d", [0.97, 0.98], diverged=True), rec("n", [0.99, 0.99], ckpt=False), rec("ok", [0.7, 0.8])], ["ok"]),
    ([rec("x", [], ckpt=False)], []),
])
def test_choose(records: list[TrialRecord], expect: list[str]) -> None:
    assert [r.trial_id for r in choose(records, "val_acc", top_k=2)] == expect


def test_choose_val_loss_is_minimised() -> None:
    records = [rec("a", [0.5, 0.9]), rec("b", [0.6, 0.7])]
    assert choose(records, "val_loss")[0].trial_id == "a"


@pytest.mark.parametrize("r, state", [
    (rec("c", [0.1, 0.2, 0.3, 0.4]), "completed"),
    (rec("s", [0.1, 0.2]), "stopped@2"),
    (rec("d", [0.1], diverged=True), "diverged"),
    (rec("f", [0.1], error="ValueError: boom"), "failed"),
    (rec("o", [], error="TrialOOMError: CUDA out of memory with batch_size 512"), "oom"),
])
def test_trial_state(r: TrialRecord, state: str) -> None:
    assert trial_state(r, max_t=4) == state


def test_results_read_a_current_trials_json_and_ignore_a_stale_one(tmp_path: Path) -> None:
    from raytune_ft.runs import TrialRecord, records_from_json

    run = tmp_path / "run"
    (run / "tune").mkdir(parents=True)
    state = run / "tune" / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text("{}")
    rec = TrialRecord("a1", {"lr": 0.1}, [{"epoch": 1, "val_acc": 0.5, "diverged": False}],
                      "/ckpt", None)
    (run / "trials.json").write_text(json.dumps([rec.__dict__]))
    os.utime(state, (1e9, 1e9))  # Ray's state older than trials.json: the run is finished
    assert records_from_json(run) == [rec]
    os.utime(run / "trials.json", (1e9 - 5, 1e9 - 5))  # a resume ran since: read Ray's state
    assert records_from_json(run) is None


# --------------------------------------------------------------------------------------------
# Cost: records, bounds on promotion, the accuracy/latency Pareto front (made-up trials).
# --------------------------------------------------------------------------------------------
def costly(tid: str, accs: list[float], ms: float | None, params: int | None = None,
           **kw: object) -> TrialRecord:
    """`rec` whose every epoch carries the cost the trainer reports (none when ms is None)."""
    r = rec(tid, accs, **kw)
    if ms is not None:
        for i, h in enumerate(r.history):
            h.update(params=params or int(ms * 1e6), flops=ms * 1e8, latency_b1_ms=ms,
                     latency_b32_ms=ms * 20, epoch_s=10.0 + i)
    return r


def test_cost_is_read_from_the_history_and_empty_for_old_runs() -> None:
    r = costly("a", [0.5, 0.6, 0.7], 2.0, params=1000)
    assert r.cost == {"params": 1000, "flops": 2e8, "latency_b1_ms": 2.0,
                      "latency_b32_ms": 40.0, "epoch_s": 11.0}  # epoch_s: the mean
    assert rec("old", [0.5]).cost == {}


def test_trials_json_carries_the_cost_and_reads_back(tmp_path: Path) -> None:
    from raytune_ft.runs import read_records, write_records

    records = [costly("a", [0.5, 0.6], 2.0), rec("old", [0.4])]
    write_records(tmp_path, records)
    raw = json.loads((tmp_path / "trials.json").read_text())
    assert raw[0]["cost"]["latency_b1_ms"] == 2.0 and raw[1]["cost"] == {}
    assert read_records(tmp_path / "trials.json") == records


@pytest.mark.parametrize("records, expect", [
    # Dominated points dropped; the front cheapest first, its metric rising along it.
    ([costly("fast", [0.80], 1.0), costly("mid", [0.90], 3.0), costly("slow", [0.95], 9.0),
      costly("worse", [0.85], 4.0), costly("dearer", [0.80], 2.0)], ["fast", "mid", "slow"]),
    # Same cost: the better metric only. Same cost and metric: the smallest trial id only.
    ([costly("b", [0.9], 2.0), costly("a", [0.9], 2.0), costly("c", [0.7], 2.0)], ["a"]),
    # Same metric, different cost: the cheaper only.
    ([costly("x", [0.9], 5.0), costly("y", [0.9], 4.0)], ["y"]),
    # Trials without a cost (an old run) or without a metric value are left out.
    ([costly("old", [0.99], None), costly("new", [0.5], 1.0), costly("none", [], 0.1)],
     ["new"]),
    ([], []),
])
def test_pareto_front(records: list[TrialRecord], expect: list[str]) -> None:
    from raytune_ft.selection import pareto_front

    assert [r.trial_id for r in pareto_front(records, "val_acc", "max")] == expect
    # Deterministic whatever the input order.
    assert [r.trial_id for r in pareto_front(records[::-1], "val_acc", "max")] == expect


def test_pareto_front_minimises_a_loss_and_takes_another_cost() -> None:
    from raytune_ft.selection import pareto_front

    # val_loss = 1 - acc: the same front as val_acc; by params the order changes.
    records = [costly("a", [0.8], 1.0, params=300), costly("b", [0.9], 3.0, params=100),
               costly("c", [0.7], 2.0, params=200)]
    assert [r.trial_id for r in pareto_front(records, "val_loss", "min")] == ["a", "b"]
    assert [r.trial_id for r in pareto_front(records, "val_acc", "max", cost="params")] == ["b"]


def test_choose_honours_the_bounds() -> None:
    records = [costly("big", [0.9, 0.99], 8.0, params=9000),
               costly("small", [0.8, 0.90], 2.0, params=1000),
               costly("tiny", [0.6, 0.70], 1.0, params=900),
               costly("early", [0.95], 1.5, params=800)]  # one epoch: never beats full runs
    assert [r.trial_id for r in choose(records, "val_acc")] == ["big"]
    assert [r.trial_id for r in choose(records, "val_acc", max_latency_ms=5)] == ["small"]
    assert [r.trial_id for r in choose(records, "val_acc", 3, max_params=1000)] == ["small",
                                                                                   "tiny"]
    assert [r.trial_id for r in choose(records, "val_acc", max_latency_ms=1.2,
                                       max_params=950)] == ["tiny"]
    # Only the one-epoch trial fits: the best that fits is promoted.
    assert [r.trial_id for r in choose(records, "val_acc", max_latency_ms=1.5,
                                       max_params=800)] == ["early"]


def test_when_no_trial_fits_the_message_says_so_with_the_smallest_seen() -> None:
    from raytune_ft.errors import UserError

    records = [costly("a", [0.9, 0.9], 3.25, params=2000), costly("b", [0.8, 0.8], 4.0),
               costly("old", [0.99, 0.99], None)]
    with pytest.raises(UserError) as e:
        choose(records, "val_acc", max_latency_ms=2.5)
    msg = str(e.value)
    assert e.value.field == "promote.max_latency_ms" and "\n" not in msg
    assert "no trial fits max_latency_ms 2.5 ms" in msg
    assert "the smallest latency_b1_ms is 3.25 ms" in msg
    assert "1 of them have no cost data" in msg and "cannot satisfy a bound" in msg
    with pytest.raises(UserError, match="max_params 100 .the smallest params is 2000"):
        choose(records, "val_acc", max_params=100)
    # A run without costs at all: no trial can satisfy a bound.
    with pytest.raises(UserError, match="none has latency_b1_ms.*2 of them have no cost"):
        choose([rec("o1", [0.5]), rec("o2", [0.6])], "val_acc", max_latency_ms=100)
    # Nothing promotable at all is not an error (nothing to promote).
    assert choose([costly("n", [0.9], 9.0, ckpt=False)], "val_acc", max_latency_ms=1) == []


CHOICE = """\
name: pick
model: {arch: {space: choice, values: [resnet18, mobilenet_v3_small]}, weights: none}
data: {source: digits, image_size: 16}
train: {max_epochs: 2}
search:
  lr: {space: loguniform, low: 1.0e-3, high: 1.0e-2}
  batch_size: 32
promote: {max_latency_ms: 2.5}
"""


def test_results_show_the_arch_and_the_cost_columns() -> None:
    from raytune_ft.spec.yaml_io import parse_spec
    from raytune_ft.tables import summary_rows, summary_table

    spec = parse_spec(CHOICE, file="pick.yaml")
    a = costly("a", [0.5, 0.9], 3.0, params=11_200_000)
    a.params = {"arch": "resnet18", "lr": 0.004}
    b = costly("b", [0.6, 0.8], 1.25, params=1_500_000)
    b.params = {"arch": "mobilenet_v3_small", "lr": 0.002}
    old = rec("old", [0.3, 0.4])  # no cost: dashes
    old.params = {"arch": "resnet18", "lr": 0.001}
    lines = summary_table([old, b, a], spec).splitlines()
    assert lines[0].split() == ["trial", "state", "epochs", "best", "val_acc", "Mparams",
                                "MFLOPs", "ms", "b1", "s/epoch", "arch", "lr"]
    assert lines[2].split() == ["a", "completed", "2", "0.9000", "11.2", "300", "3", "10.5",
                                "resnet18", "0.004"]
    assert lines[3].split()[4:8] == ["1.5", "125", "1.25", "10.5"]
    assert lines[4].split()[4:8] == ["-", "-", "-", "-"]
    rows = summary_rows([old, b, a], spec)
    assert rows[0]["arch"] == "resnet18" and rows[0]["latency_b1_ms"] == 3.0
    assert rows[0]["latency_b32_ms"] == 60.0 and rows[2]["params"] is None
    assert list(rows[0]) == list(rows[2])  # one set of columns (CSV)
    # GFLOPs once a model passes 1e9.
    a.history[-1]["flops"] = 4.1e9
    assert "GFLOPs" in summary_table([a], spec)
    # A run of rtft before costs: no cost columns at all.
    assert "Mparams" not in summary_table([old], spec) and "params" not in \
        summary_rows([old], spec)[0]


def test_choose_for_takes_the_spec_bounds_and_the_pareto_front() -> None:
    from raytune_ft.selection import choose_for
    from raytune_ft.spec.yaml_io import parse_spec

    spec = parse_spec(CHOICE, file="pick.yaml")
    records = [costly("big", [0.9, 0.99], 8.0), costly("small", [0.8, 0.90], 2.0),
               costly("tiny", [0.6, 0.70], 1.0), costly("worse", [0.5, 0.60], 1.5)]
    assert [r.trial_id for r in choose_for(spec, records)] == ["small"]  # max_latency_ms 2.5
    assert [r.trial_id for r in choose_for(spec, records, pareto=True)] == ["tiny", "small"]
    free = spec.model_copy(update={"promote": spec.promote.model_copy(
        update={"max_latency_ms": None})})
    assert [r.trial_id for r in choose_for(free, records, pareto=True)] == ["tiny", "small",
                                                                            "big"]
    from raytune_ft.errors import UserError

    with pytest.raises(UserError, match="--pareto needs each trial's latency_b1_ms"):
        choose_for(free, [rec("o", [0.5]), rec("p", [0.6])], pareto=True)


def test_latency_is_per_model_the_median_of_its_trials() -> None:
    from raytune_ft.selection import model_costs, pareto_front

    same = [costly(t, [acc], 5.0, params=11) for t, acc in (("r1", 0.97), ("r2", 0.98),
                                                           ("r3", 0.90))]
    for r, ms in zip(same, (5.4, 5.8, 9.9), strict=True):  # one model, three noisy readings
        for h in r.history:
            h["latency_b1_ms"] = ms
    small = costly("m", [0.6], 5.6, params=2)
    records = [*same, small]
    costs = model_costs(records)
    assert [costs[t]["latency_b1_ms"] for t in ("r1", "r2", "r3")] == [5.8, 5.8, 5.8]
    assert costs["m"]["latency_b1_ms"] == 5.6 and same[0].cost["latency_b1_ms"] == 5.4
    # By each trial's own reading r1 (5.4 ms) would lead the front and fit a 5.7 ms bound;
    # per model, the resnet-like model is at 5.8 ms: only its best trial is on the front,
    # after the small one, and the bound leaves the small one only.
    assert [r.trial_id for r in pareto_front(records, "val_acc", "max")] == ["m", "r2"]
    assert [r.trial_id for r in choose(records, "val_acc", max_latency_ms=5.7)] == ["m"]


def test_the_front_takes_each_models_latency_over_the_whole_run() -> None:
    """A model's trial stopped early still counts in that model's latency: the front, among
    the trials that reached the top epoch, compares models, not single readings."""
    from raytune_ft.selection import choose_for
    from raytune_ft.spec.yaml_io import parse_spec

    free = parse_spec(CHOICE, file="pick.yaml")
    free = free.model_copy(update={"promote": free.promote.model_copy(
        update={"max_latency_ms": None})})
    m_full, m_early = costly("m_full", [0.5, 0.6], 6.2, params=2), costly("m_early", [0.4], 3.8,
                                                                          params=2)
    for h in m_early.history:  # the same model as m_full: same params and FLOPs
        h["flops"] = m_full.history[0]["flops"]
    r = costly("r", [0.9, 0.95], 5.6, params=11)
    # m's latency is the median of 6.2 and 3.8, 5.0 ms: cheaper than r, so on the front
    assert [x.trial_id for x in choose_for(free, [m_full, m_early, r], pareto=True)] == [
        "m_full", "r"]
