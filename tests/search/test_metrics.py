"""SearchMetrics (search/metrics.py) driven by Tune's events, without Ray: what it records, that
a result never walks the trials, that it pickles without its Ray objects; and the Grafana
dashboard that charts it (cluster/grafana_rtft.json). The series in a real Ray's Prometheus
endpoint during a real search: tests/test_e2e_dashboard.py."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import ROOT, tiny_spec

from raytune_ft.search.metrics import (
    METRICS,
    REFRESH_S,
    STATES,
    SearchMetrics,
    prometheus_names,
)


class Recorded:
    """A stand-in for one ray.util.metrics object: the last value per tag set, or the sum."""

    def __init__(self, kind: str) -> None:
        self.kind, self.values, self.sets = kind, {}, []

    def _key(self, tags: dict[str, str]) -> tuple:
        return tuple(sorted(tags.items()))

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert self.kind == "gauge"
        self.values[self._key(tags)] = value
        self.sets.append(dict(tags))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert self.kind == "counter" and value > 0
        k = self._key(tags or {})
        self.values[k] = self.values.get(k, 0) + value

    def observe(self, value: float, tags: dict[str, str]) -> None:
        assert self.kind == "histogram"
        self.values.setdefault(self._key(tags), []).append(value)

    def get(self, **tags: str) -> Any:
        return self.values.get(self._key(tags))


def fake_metrics() -> dict[str, Recorded]:
    return {name: Recorded(kind) for name, (kind, _, _) in METRICS.items()}


class NoWalk(list):
    """Tune's list of all trials, which a per-result handler must not walk (O(1) a result)."""

    def __iter__(self):  # noqa: ANN204
        raise AssertionError("walked all trials on a single event")

    def __len__(self) -> int:
        raise AssertionError("counted all trials on a single event")


def trial(tid: str, status: str = "RUNNING", **last: Any) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, status=status, last_result=dict(last) or None)


@pytest.fixture
def cb(tmp_path: Path) -> SearchMetrics:
    spec = tiny_spec(tmp_path, n=6)  # val_acc (max), max_t 2
    recorded = fake_metrics()
    cb = SearchMetrics(spec, make=lambda: recorded)
    cb.setup(stop=None, num_samples=6, total_num_samples=6)
    cb.on_step_begin(0, [])
    return cb


def states(cb: SearchMetrics) -> dict[str, float]:
    m = cb._m["rtft_trials"]
    return {s: m.get(run="tiny", state=s) for s in STATES}


def result(epoch: int, acc: float, best: float, secs: float = 1.5, **kw: Any) -> dict:
    return {"epoch": epoch, "training_iteration": epoch, "val_acc": acc, "best_val_acc": best,
            "time_this_iter_s": secs, **kw}


def test_every_state_starts_at_zero_and_the_plan_is_published(cb: SearchMetrics) -> None:
    assert states(cb) == dict.fromkeys(STATES, 0)
    assert cb._m["rtft_trials_planned"].get(run="tiny") == 6


def test_a_search_told_by_tune_events(cb: SearchMetrics) -> None:
    trials = NoWalk()
    a, b, c, d = (trial(t) for t in ("a_00000", "a_00001", "a_00002", "a_00003"))
    for t in (a, b, c, d):
        cb.on_trial_start(1, trials, t)
    assert states(cb)["running"] == 4
    cb.on_trial_result(2, trials, a, result(1, 0.50, 0.50, secs=2.0))
    cb.on_trial_result(2, trials, b, result(1, 0.70, 0.70, secs=3.0))
    cb.on_trial_result(2, trials, c, result(1, 0.0, 0.0, diverged=True))
    a.last_result = result(1, 0.50, 0.50)
    cb.on_trial_complete(3, trials, a)  # ASHA stopped it after epoch 1 (max_t 2)
    c.last_result = result(1, 0.0, 0.0, diverged=True)
    cb.on_trial_complete(3, trials, c)
    cb.on_trial_result(4, trials, b, result(2, 0.65, 0.70, secs=4.0))
    b.last_result = result(2, 0.65, 0.70)
    cb.on_trial_complete(4, trials, b)
    cb.on_trial_recover(4, trials, d)  # failed once, retried ...
    assert states(cb)["retrying"] == 1
    cb.on_trial_start(5, trials, d)
    cb.on_trial_error(6, trials, d)  # ... and failed for good
    m = cb._m
    assert states(cb) == {"running": 0, "retrying": 0, "completed": 1, "stopped": 1,
                          "diverged": 1, "failed": 1}
    assert m["rtft_best_metric"].get(run="tiny", metric="val_acc") == 0.70  # best, not last
    assert m["rtft_epochs_finished"].get(run="tiny") == 4
    assert m["rtft_trials_stopped"].get(run="tiny", rung="1") == 1
    assert m["rtft_trial_epoch_seconds"].get(run="tiny", trial="a_00001") == 4.0
    assert m["rtft_trial_metric"].get(run="tiny", trial="a_00001", metric="val_acc") == 0.65
    # A diverged trial's reported value is the worst one by design, not a measurement.
    assert m["rtft_trial_metric"].get(run="tiny", trial="a_00002", metric="val_acc") is None
    assert sorted(m["rtft_epoch_seconds"].get(run="tiny")) == [1.5, 2.0, 3.0, 4.0]


def test_min_mode_keeps_the_lowest(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, extra="metric: val_loss\n")
    recorded = fake_metrics()
    cb = SearchMetrics(spec, make=lambda: recorded)
    t = trial("x_00000")
    for loss in (0.9, 0.4, 0.6):
        cb.on_trial_result(1, NoWalk(), t, {"val_loss": loss, "time_this_iter_s": 1.0})
    assert recorded["rtft_best_metric"].get(run="tiny", metric="val_loss") == 0.4


def test_a_resumed_search_counts_the_trials_that_had_ended_once(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, n=6)
    recorded = fake_metrics()
    cb = SearchMetrics(spec, make=lambda: recorded)
    restored = [trial("r_00000", "TERMINATED", **result(2, 0.8, 0.9)),
                trial("r_00001", "TERMINATED", **result(1, 0.3, 0.3)),
                trial("r_00002", "ERROR", **result(1, 0.2, 0.2)),
                trial("r_00003", "PENDING", **result(1, 0.95, 0.95))]  # will run again
    cb.on_step_begin(0, restored)
    cb.on_step_begin(1, NoWalk())  # once only
    assert states(cb)["completed"] == 1 and states(cb)["stopped"] == 1
    assert states(cb)["failed"] == 1 and states(cb)["running"] == 0
    assert recorded["rtft_epochs_finished"].get(run="tiny") == 4
    assert recorded["rtft_best_metric"].get(run="tiny", metric="val_acc") == 0.9


def test_pickles_without_its_ray_objects(tmp_path: Path) -> None:
    # Tune keeps its callbacks in the run's tuner.pkl; a resumed search makes its own metrics.
    cb = SearchMetrics(tiny_spec(tmp_path), make=fake_metrics)
    cb.on_trial_start(1, NoWalk(), trial("p_00000"))
    assert cb._m is not None
    back = pickle.loads(pickle.dumps(cb))
    assert back._m is None and back._state == {"p_00000": "running"}


def test_a_metric_that_never_arrives_records_nothing(cb: SearchMetrics) -> None:
    t = trial("n_00000")
    cb.on_trial_result(1, NoWalk(), t, {"time_this_iter_s": float("nan"), "val_acc": None})
    assert cb._m["rtft_trial_epoch_seconds"].get(run="tiny", trial="n_00000") is None
    assert cb._m["rtft_best_metric"].values == {}


def test_gauges_are_recorded_again_for_the_run_and_running_trials_only(tmp_path: Path) -> None:
    # Ray drops a gauge not recorded within two exports: every REFRESH_S the controller's
    # steps record the run's gauges and the running trials' again, never an ended trial's.
    now = [0.0]
    recorded = fake_metrics()
    cb = SearchMetrics(tiny_spec(tmp_path), make=lambda: recorded, clock=lambda: now[0])
    run, done = trial("g_00000"), trial("g_00001")
    for t in (run, done):
        cb.on_trial_result(1, NoWalk(), t, result(1, 0.5, 0.5))
    done.last_result = result(1, 0.5, 0.5)
    cb.on_trial_complete(2, NoWalk(), done)
    for m in recorded.values():
        m.sets.clear()
    now[0] += REFRESH_S / 2
    cb.on_step_end(3, NoWalk())
    assert all(not m.sets for m in recorded.values())  # not yet
    now[0] += REFRESH_S
    cb.on_step_end(4, NoWalk())
    assert [t["trial"] for t in recorded["rtft_trial_epoch_seconds"].sets] == ["g_00000"]
    assert [t["trial"] for t in recorded["rtft_trial_metric"].sets] == ["g_00000"]
    assert {t["state"] for t in recorded["rtft_trials"].sets} == set(STATES)
    assert recorded["rtft_trials_planned"].sets and recorded["rtft_best_metric"].sets


# The Grafana dashboard ---------------------------------------------------------------------
GRAFANA = ROOT / "cluster" / "grafana_rtft.json"


def _exprs(board: dict) -> list[str]:
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    out += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return out


def test_grafana_dashboard_charts_exactly_what_is_published() -> None:
    board = json.loads(GRAFANA.read_text())
    assert board["uid"] and board["title"]
    used = {n for e in _exprs(board) for n in re.findall(r"\bray_rtft_\w+", e)}
    assert used <= prometheus_names(), used - prometheus_names()
    charted = {re.sub(r"_(total|bucket|sum|count)$", "", n).removeprefix("ray_") for n in used}
    assert charted == set(METRICS), set(METRICS) ^ charted
    # Ray's own dashboards' conventions: the datasource and session variables, every panel
    # on the ${datasource}; every query filtered to the chosen session and run.
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "SessionName", "run", "window"} <= names
    for p in board["panels"]:
        assert p["datasource"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert 'SessionName=~"$SessionName"' in t["expr"] and 'run=~"$run"' in t["expr"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
