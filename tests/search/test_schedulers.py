"""Our schedulers (search/schedulers.py), with made-up trials: ASHA's rungs persist across a
restart, the baseline is exempt, and Ray is asked for a snapshot only when trials start or end."""

from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import pytest

from raytune_ft.search.schedulers import PersistentASHA


class _T:
    def __init__(self, tid: str) -> None:
        self.trial_id = tid


def _asha(run_dir: Path, protect_first: bool = False, metric: str = "val_acc",
          mode: str = "max", max_t: int = 4) -> PersistentASHA:
    return PersistentASHA(run_dir, protect_first=protect_first, time_attr="training_iteration",
                          max_t=max_t, metric=metric, mode=mode, grace_period=1,
                          reduction_factor=2)


def _result(epoch: int, acc: float, metric: str = "val_acc") -> dict:
    return {"training_iteration": epoch, metric: acc}


def test_rungs_survive_a_restart_from_the_pickled_scheduler(tmp_path: Path) -> None:
    fresh = pickle.dumps(_asha(tmp_path))  # what Tuner.restore brings back: empty rungs
    first = pickle.loads(fresh)
    first.on_trial_add(None, _T("a"))
    assert first.on_trial_result(None, _T("a"), _result(1, 0.9)) == "CONTINUE"
    again = pickle.loads(fresh)  # the driver died; a new one restores the scheduler
    again.on_trial_add(None, _T("b"))
    # Judged against a's record from before the crash, b is stopped at the first rung ...
    assert again.on_trial_result(None, _T("b"), _result(1, 0.5)) == "STOP"
    # ... and a, re-reporting epoch 1 from its checkpoint, is not judged twice.
    assert again.on_trial_result(None, _T("a"), _result(1, 0.1)) == "CONTINUE"
    decisions = (tmp_path / "asha_decisions.jsonl").read_text().splitlines()
    # One line per trial and epoch: a's epoch 1 again is not logged again.
    assert [json.loads(d)["action"] for d in decisions] == ["CONTINUE", "STOP"]


def test_the_first_trial_is_never_stopped_early(tmp_path: Path) -> None:
    asha = _asha(tmp_path, protect_first=True)
    for tid in ("baseline", "a", "b"):
        asha.on_trial_add(None, _T(tid))
    assert asha.on_trial_result(None, _T("a"), _result(1, 0.9)) == "CONTINUE"
    assert asha.on_trial_result(None, _T("b"), _result(1, 0.8)) == "STOP"
    assert asha.on_trial_result(None, _T("baseline"), _result(1, 0.1)) == "CONTINUE"
    assert asha.on_trial_result(None, _T("baseline"), _result(4, 0.1)) == "STOP"  # max_t


def _stream(n_trials: int, seed: int) -> list[tuple[str, int, float, bool]]:
    """Results as ASHA sees them with 4 trials at a time: interleaved epochs, made-up values,
    and whether it is the trial's last (then Ray calls on_trial_complete)."""
    rng = random.Random(seed)
    quality = {f"t{i}": rng.random() for i in range(n_trials)}
    running, out, nxt = {}, [], 0
    while nxt < n_trials or running:
        while len(running) < 4 and nxt < n_trials:
            running[f"t{nxt}"] = 0
            nxt += 1
        tid = rng.choice(sorted(running))
        running[tid] += 1
        value = quality[tid] + 0.1 * running[tid] + rng.gauss(0, 0.05)
        last = running[tid] >= 8 or rng.random() < 0.2  # ended (max_t, or stopped)
        out.append((tid, running[tid], value, last))
        if last:
            del running[tid]
    return out


@pytest.mark.parametrize("metric, mode", [("val_acc", "max"), ("val_loss", "min")])
def test_a_scheduler_rebuilt_from_the_run_folder_decides_as_the_uninterrupted_one(
        tmp_path: Path, metric: str, mode: str) -> None:
    """Crash after k results, rebuild from the folder, feed the rest: same decisions."""
    stream = _stream(30, seed=1)
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    ref_dir.mkdir()
    crash_dir.mkdir()
    ref = _asha(ref_dir, True, metric, mode, max_t=8)
    fresh = pickle.dumps(_asha(crash_dir, True, metric, mode, max_t=8))
    live = pickle.loads(fresh)
    seen: set[str] = set()
    k = len(stream) // 2
    for i, (tid, epoch, v, last) in enumerate(stream):
        for s in (ref, live):
            if tid not in seen:
                s.on_trial_add(None, _T(tid))
        seen.add(tid)
        if i == k:  # the driver dies; the next one restores the pickled, empty scheduler
            live = pickle.loads(fresh)
        value = v if mode == "max" else -v
        assert (live.on_trial_result(None, _T(tid), _result(epoch, value, metric))
                == ref.on_trial_result(None, _T(tid), _result(epoch, value, metric))), i
        if last:  # Ray's ASHA records a finished trial's result at max_t here
            for s in (ref, live):
                s.on_trial_complete(None, _T(tid), _result(epoch, value, metric))
    assert live.rungs() == ref.rungs() and ref.rungs()[8.0]
    assert (crash_dir / "asha_decisions.jsonl").read_text() == \
        (ref_dir / "asha_decisions.jsonl").read_text()


def test_a_line_cut_short_by_a_crash_is_dropped_and_the_next_starts_clean(
        tmp_path: Path) -> None:
    first = _asha(tmp_path, protect_first=True)
    first.on_trial_add(None, _T("a"))
    first.on_trial_result(None, _T("a"), _result(1, 0.9))
    log = tmp_path / "asha_decisions.jsonl"
    log.write_text(log.read_text() + '{"trial": "b", "epo')  # the driver died mid-write
    again = _asha(tmp_path, protect_first=True)
    again.on_trial_add(None, _T("b"))
    assert again.on_trial_result(None, _T("b"), _result(1, 0.5)) == "STOP"  # judged vs a
    lines = [json.loads(x) for x in log.read_text().splitlines()]  # every line parses
    assert [d["action"] for d in lines] == ["PROTECT", "CONTINUE", "STOP"]
    assert lines[0]["trial"] == "a" and again._protected == ["a"]  # not b, added first now


def test_rungs_and_decisions_agree_in_sign_for_a_metric_to_minimise(tmp_path: Path) -> None:
    asha = _asha(tmp_path, metric="val_loss", mode="min")
    for tid, loss in (("a", 0.5), ("b", 0.7), ("c", 0.2)):
        asha.on_trial_add(None, _T(tid))
        asha.on_trial_result(None, _T(tid), _result(1, loss, "val_loss"))
    logged = {json.loads(x)["trial"]: json.loads(x)["value"]
              for x in (tmp_path / "asha_decisions.jsonl").read_text().splitlines()}
    assert asha.rungs()[1.0] == logged == {"a": 0.5, "b": 0.7, "c": 0.2}
    # The worst loss so far is stopped at the rung, the best goes on.
    asha.on_trial_add(None, _T("d"))
    asha.on_trial_add(None, _T("e"))
    assert asha.on_trial_result(None, _T("d"), _result(1, 0.9, "val_loss")) == "STOP"
    assert asha.on_trial_result(None, _T("e"), _result(1, 0.1, "val_loss")) == "CONTINUE"



def test_schedulers_ask_ray_for_a_snapshot_when_trials_start_and_end(tmp_path: Path) -> None:
    """The fix bench/overhead.py found: instead of a state snapshot at every controller step,
    our schedulers flag one (Ray's own force flag) when a trial starts, ends or fails."""
    from types import SimpleNamespace

    from raytune_ft.search.schedulers import FIFO, PersistentASHA

    def controller() -> SimpleNamespace:
        return SimpleNamespace(_checkpoint_manager=SimpleNamespace(_should_force_sync_up=False))

    asha = PersistentASHA(tmp_path, time_attr="training_iteration", max_t=4, metric="val_acc",
                           mode="max", grace_period=1, reduction_factor=2)
    for sched in (asha, FIFO()):
        trial = SimpleNamespace(trial_id="t1", config={})
        raw = controller()
        wrapped = SimpleNamespace(_tune_controller=raw)  # what Ray passes to on_trial_add
        sched.on_trial_add(wrapped, trial)
        assert raw._checkpoint_manager._should_force_sync_up
        raw._checkpoint_manager._should_force_sync_up = False
        assert sched.on_trial_result(raw, trial, {"training_iteration": 1, "val_acc": 0.5}) \
            == "CONTINUE"
        assert not raw._checkpoint_manager._should_force_sync_up  # results: no extra snapshot
        sched.on_trial_complete(raw, trial, {"training_iteration": 1, "val_acc": 0.5})
        assert raw._checkpoint_manager._should_force_sync_up
        sched.on_trial_add(None, SimpleNamespace(trial_id="t2", config={}))  # unit tests: None


def test_forced_snapshots_take_at_most_a_twentieth_of_the_driver(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot writes every trial's state: forced at every trial end it would cost time
    quadratic in the trials. Forced only once 19x the last snapshot's duration has passed."""
    from types import SimpleNamespace

    from raytune_ft.search import ray_private
    from raytune_ft.search.schedulers import FIFO

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(ray_private, "time", SimpleNamespace(monotonic=lambda: clock.now))

    class Manager:  # the part of Ray's _ExperimentCheckpointManager that is used
        def __init__(self, takes: float) -> None:
            self._should_force_sync_up, self._last_save_time = False, float("-inf")
            self.takes = takes

        def sync_up_experiment_state(self, save_fn: object = None) -> None:
            if self._should_force_sync_up:
                clock.now += self.takes
                self._last_save_time, self._should_force_sync_up = clock.now, False

    fifo = FIFO()
    quick, slow = Manager(takes=0.001), Manager(takes=5.0)  # cheap: under SNAPSHOT_CHEAP_S
    for manager in (quick, slow):
        raw = SimpleNamespace(_checkpoint_manager=manager)
        fifo.on_trial_add(raw, SimpleNamespace(trial_id="a", config={}))
        assert manager._should_force_sync_up  # the first: nothing measured yet
        manager.sync_up_experiment_state()  # the controller's step ends: the snapshot
        clock.now += 1.0  # the trial runs for a second
        fifo.on_trial_complete(raw, SimpleNamespace(trial_id="a", config={}), {})
    assert quick._should_force_sync_up  # cheap snapshots: one at every trial end, as before
    assert not slow._should_force_sync_up  # 5 s each: not again within 95 s
    clock.now += 95.0
    fifo.on_trial_complete(SimpleNamespace(_checkpoint_manager=slow),
                           SimpleNamespace(trial_id="b", config={}), {})
    assert slow._should_force_sync_up


def test_the_first_n_trials_run_to_the_end(tmp_path: Path) -> None:
    """Baseline and warm-start configurations (protect_first=n) are never stopped early."""
    asha = _asha(tmp_path, protect_first=3)
    for tid in ("base", "warm1", "warm2", "x", "y"):
        asha.on_trial_add(None, _T(tid))
    assert asha.on_trial_result(None, _T("x"), _result(1, 0.9)) == "CONTINUE"
    assert asha.on_trial_result(None, _T("y"), _result(1, 0.8)) == "STOP"
    for tid in ("base", "warm1", "warm2"):
        assert asha.on_trial_result(None, _T(tid), _result(1, 0.1)) == "CONTINUE"
    restored = _asha(tmp_path, protect_first=3)
    restored.on_trial_add(None, _T("z"))  # after a restore: still the same three
    assert restored._protected == ["base", "warm1", "warm2"]
    assert restored.on_trial_result(None, _T("z"), _result(1, 0.05)) == "STOP"


# -- several brackets (scheduler.brackets) ----------------------------------------------------
def _brackets(run_dir: Path, n: int = 2, protect_first: int = 0, max_t: int = 4,
              grace: int = 2) -> PersistentASHA:
    return PersistentASHA(run_dir, protect_first=protect_first, time_attr="training_iteration",
                          max_t=max_t, metric="val_acc", mode="max", grace_period=grace,
                          reduction_factor=2, brackets=n)


def test_trials_take_turns_in_the_brackets_whatever_numpy_draws(tmp_path: Path) -> None:
    import numpy as np

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    asha = _brackets(tmp_path / "a", n=3, max_t=8, grace=1)
    np.random.seed(1)
    tids = [f"t{i}" for i in range(7)]
    for tid in tids:
        asha.on_trial_add(None, _T(tid))
    assert asha.brackets == 3
    assert [asha.bracket_of(t) for t in tids] == [0, 1, 2, 0, 1, 2, 0]
    other = _brackets(tmp_path / "b", n=3, max_t=8, grace=1)
    np.random.seed(2)  # Ray's own draw would differ: ours does not
    for tid in tids:
        other.on_trial_add(None, _T(tid))
    assert [other.bracket_of(t) for t in tids] == [0, 1, 2, 0, 1, 2, 0]
    adds = [json.loads(x) for x in (tmp_path / "a" / "asha_decisions.jsonl").read_text()
            .splitlines()]
    assert [(d["trial"], d["action"], d["bracket"]) for d in adds] == \
        [(t, "ADD", i % 3) for i, t in enumerate(tids)]


@pytest.mark.parametrize("stale", [{}, {"_n_brackets": 1}, {"_bracket_of": None}],
                         ids=["as_pickled", "stale_count", "before_brackets"])
def test_the_bracket_count_is_rays_after_unpickling(tmp_path: Path, stale: dict) -> None:
    """The count the turns use is Ray's, whatever the pickle held: one pickled without it
    (before brackets) or with a stale one still takes turns in Ray's brackets."""
    asha = _brackets(tmp_path, n=3, max_t=8, grace=1)
    for key, value in stale.items():
        if value is None:
            del asha.__dict__[key], asha.__dict__["_n_brackets"]
        else:
            asha.__dict__[key] = value
    restored = pickle.loads(pickle.dumps(asha))
    assert restored.brackets == 3
    for tid in ("a", "b", "c", "d"):
        restored.on_trial_add(None, _T(tid))
    assert [restored.bracket_of(t) for t in "abcd"] == [0, 1, 2, 0]


def test_one_bracket_logs_no_bracket(tmp_path: Path) -> None:
    asha = _brackets(tmp_path, n=1)
    asha.on_trial_add(None, _T("a"))
    asha.on_trial_result(None, _T("a"), _result(2, 0.5))
    lines = [json.loads(x) for x in (tmp_path / "asha_decisions.jsonl").read_text().splitlines()]
    assert [d["action"] for d in lines] == ["CONTINUE"] and "bracket" not in lines[0]
    assert asha.bracket_of("a") == 0


def test_the_second_bracket_stops_nothing_before_max_t(tmp_path: Path) -> None:
    """max_t 4, grace 2, η 2: bracket 0 has its rung at epoch 2 (half stop there), bracket 1
    only at max_t (where every trial ends anyway)."""
    asha = _brackets(tmp_path)
    assert list(asha.rungs(0)) == [2.0, 4.0] and list(asha.rungs(1)) == [4.0]
    for i in range(8):  # t0, t2, … in bracket 0; t1, t3, … in bracket 1
        asha.on_trial_add(None, _T(f"t{i}"))
    # Each trial worse than the ones before it: in bracket 0 all but the first stop at epoch 2.
    acts: dict[str, list[str]] = {}
    for i in range(8):
        acts[f"t{i}"] = []
        for epoch in (1, 2, 3, 4):
            acts[f"t{i}"].append(asha.on_trial_result(None, _T(f"t{i}"),
                                                      _result(epoch, 0.9 - 0.1 * i)))
            if acts[f"t{i}"][-1] == "STOP":
                break
    assert acts["t0"] == ["CONTINUE"] * 3 + ["STOP"]  # max_t
    assert all(acts[f"t{i}"] == ["CONTINUE", "STOP"] for i in (2, 4, 6))
    assert all(acts[f"t{i}"] == ["CONTINUE"] * 3 + ["STOP"] for i in (1, 3, 5, 7))
    assert set(asha.rungs(0)[2.0]) == {"t0", "t2", "t4", "t6"} and not asha.rungs(1)[4.0]


def test_brackets_and_rungs_survive_a_restore(tmp_path: Path) -> None:
    """The driver dies; a new scheduler on the same run folder replays the log: every trial
    is in its bracket, every bracket has its rungs, and new trials go on taking turns."""
    stream = _stream(24, seed=3)
    live = _brackets(tmp_path, n=3, protect_first=2, max_t=8, grace=1)
    seen: list[str] = []
    for tid, epoch, v, last in stream[: len(stream) // 2]:
        if tid not in seen:
            seen.append(tid)
            live.on_trial_add(None, _T(tid))
        live.on_trial_result(None, _T(tid), _result(epoch, v))
        if last:
            live.on_trial_complete(None, _T(tid), _result(epoch, v))
    restored = pickle.loads(pickle.dumps(_brackets(tmp_path, n=3, protect_first=2, max_t=8,
                                                   grace=1)))
    assert [restored.bracket_of(t) for t in seen] == [live.bracket_of(t) for t in seen] \
        == [i % 3 for i in range(len(seen))]
    for b in range(3):
        assert restored.rungs(b) == live.rungs(b)
    assert any(restored.rungs(b)[m] for b in (1, 2) for m in restored.rungs(b))
    assert restored._protected == live._protected == seen[:2]
    restored.on_trial_add(None, _T("new"))
    assert restored.bracket_of("new") == len(seen) % 3
    # A trial Ray adds again after the restore keeps its bracket and is not logged twice.
    restored.on_trial_add(None, _T(seen[1]))
    assert restored.bracket_of(seen[1]) == 1
    log = (tmp_path / "asha_decisions.jsonl").read_text()
    assert log.count(f'"trial": "{seen[1]}", "epoch": 0, "value": null, "action": "ADD"') == 1


def test_a_log_without_brackets_is_all_bracket_0(tmp_path: Path) -> None:
    old = _asha(tmp_path)  # one bracket: no ADD lines
    old.on_trial_add(None, _T("a"))
    old.on_trial_result(None, _T("a"), _result(1, 0.9))
    again = PersistentASHA(tmp_path, time_attr="training_iteration", max_t=4, metric="val_acc",
                           mode="max", grace_period=1, reduction_factor=2, brackets=2)
    assert again.bracket_of("a") == 0 and again.rungs(0)[1.0] == {"a": 0.9}


@pytest.mark.parametrize("grace, max_t, rf", [(1, 4, 2), (2, 4, 2), (1, 9, 3), (1, 8, 2),
                                               (2, 12, 2), (1, 10, 3), (3, 3, 2), (1, 10, 2.5),
                                               (1, 7, 2.5), (2, 20, 2.2)])
def test_the_rungs_validate_prints_are_rays(tmp_path: Path, grace: int, max_t: int,
                                            rf: float) -> None:
    """spec_searcher computes ASHA's rungs without Ray (the spec check, `rtft validate`'s
    plan): the same as Ray's brackets, bracket by bracket, up to the most worth having. The
    plan's epochs are those at which Ray judges a trial: the first reaching each milestone
    (2.5 → epoch 3), never max_t (a trial there has ended)."""
    from raytune_ft.space import rung_plan
    from raytune_ft.spec.searcher import asha_milestones, max_brackets
    from raytune_ft.spec.yaml_io import parse_spec

    top = max_brackets(grace, max_t, rf)
    asha = PersistentASHA(tmp_path, time_attr="training_iteration", max_t=max_t,
                          metric="val_acc", mode="max", grace_period=grace,
                          reduction_factor=rf, brackets=top + 1)
    spec = parse_spec(f"name: t\ntrain: {{max_epochs: {max_t}}}\nscheduler: {{grace_period: "
                      f"{grace}, reduction_factor: {rf}, brackets: {top}}}\n", file="t.yaml")
    for s in range(top + 1):  # one past the most: it stops nothing, as the last one
        ray_rungs = list(asha.rungs(s))
        assert ray_rungs == [float(m) for m in asha_milestones(grace, max_t, rf, s)]
        # Where Ray judges: a trial reports every epoch; a rung records it when it judges it.
        judged = []
        for epoch in range(1, max_t + 1):
            tid = f"b{s}"
            if epoch == 1:
                asha.on_trial_add(None, _T(tid))
                assert asha.bracket_of(tid) == s
            before = sum(tid in rec for rec in asha.rungs(s).values())
            if asha.on_trial_result(None, _T(tid), _result(epoch, 0.5)) == "CONTINUE" and \
                    sum(tid in rec for rec in asha.rungs(s).values()) > before:
                judged.append(epoch)
        assert judged == [e for e in map(math.ceil, ray_rungs) if e < max_t]
        if s < top:
            assert [e for e, _ in rung_plan(spec, s)] == [*judged, max_t]
        assert (not judged) == (s >= top - 1)  # only the last one stops nothing


def test_a_rung_between_epochs_is_judged_at_the_next_one() -> None:
    """η 2.5 from epoch 1 to 10: Ray's milestones 1, 2.5, 6.25 are judged at epochs 1, 3, 7
    (not 2 and 5, as truncating at every step would say)."""
    from raytune_ft.space import rung_plan
    from raytune_ft.spec.yaml_io import parse_spec

    spec = parse_spec("name: t\ntrain: {max_epochs: 10}\nscheduler: {reduction_factor: 2.5, "
                      "brackets: 2}\nrun: {num_samples: 26}\n", file="t.yaml")
    assert rung_plan(spec) == [(1, 13), (3, 5), (7, 2), (10, 1)]
    assert rung_plan(spec, 1) == [(3, 13), (7, 5), (10, 2)]
