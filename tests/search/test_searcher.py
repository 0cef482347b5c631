"""The searcher loop without training: Ray's OptunaSearch (ours) and our ASHA, driven in the
order Ray's TuneController calls them, with made-up curves; the Optuna journal is read back."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from raytune_ft.search.schedulers import PersistentASHA
from raytune_ft.search.searcher import FidelityOptunaSearch

MAX_T = 4


def _loop(tmp_path: Path, telling: str, n: int = 8, fail: str | None = None,
          diverge: str | None = None) -> tuple[optuna.Study, dict[str, list[float]]]:
    """Run `n` trials two at a time through the searcher and ASHA (grace 1, η 2, max_t 4)."""
    journal = str(tmp_path / f"{telling}.journal")
    storage = JournalStorage(JournalFileBackend(journal))

    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("q", 0.0, 1.0)

    searcher = FidelityOptunaSearch(space=space, sampler=optuna.samplers.RandomSampler(seed=0),
                                    metric="val_acc", mode="max", storage=storage,
                                    study_name="s", max_t=MAX_T, telling=telling)
    asha = PersistentASHA(tmp_path, time_attr="training_iteration", metric="val_acc",
                          mode="max", max_t=MAX_T, grace_period=1, reduction_factor=2)
    curves: dict[str, list[float]] = {}
    for k in range(n):
        tid = f"t{k}"
        q = searcher.suggest(tid)["q"]
        trial = SimpleNamespace(trial_id=tid)
        asha.on_trial_add(None, trial)
        curves[tid] = []
        for epoch in range(1, MAX_T + 1):
            value = q * (0.5 + 0.1 * epoch)
            if tid == diverge and epoch == 2:
                result = {"training_iteration": epoch, "val_acc": 0.0, "diverged": True,
                          "best_val_acc": curves[tid][0]}
            else:
                curves[tid].append(value)
                result = {"training_iteration": epoch, "val_acc": value,
                          "best_val_acc": max(curves[tid]), "diverged": False}
            if tid == fail and epoch == 2:
                searcher.on_trial_complete(tid, result=None, error=True)
                break
            action = asha.on_trial_result(None, trial, result)
            if action == "STOP" or epoch == MAX_T or result["diverged"]:
                asha.on_trial_complete(None, trial, result)
                searcher.on_trial_complete(tid, result=result)  # the last result: only here
                break
            searcher.on_trial_result(tid, result)
    # Read back from the file, as a resumed search (or `rtft report`) does.
    back = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(journal)))
    return back, curves


def test_asha_stopped_trials_are_pruned_in_the_journal_with_their_curves(tmp_path: Path) -> None:
    study, curves = _loop(tmp_path, "fidelity")
    by_state = {s: [t for t in study.trials if t.state == s] for s in TrialState}
    pruned, complete = by_state[TrialState.PRUNED], by_state[TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 8
    for t in pruned:  # stopped early: every epoch it trained is an intermediate value
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and steps[-1] < MAX_T
        assert t.value == t.intermediate_values[steps[-1]]  # Optuna's own rule for PRUNED
        assert [t.intermediate_values[s] for s in steps] == pytest.approx(
            curves[f"t{t.number}"][:len(steps)])
    for t in complete:  # trained to max_t: told with the best-so-far value
        assert sorted(t.intermediate_values) == list(range(1, MAX_T + 1))
        assert t.value == pytest.approx(max(curves[f"t{t.number}"]))


def test_rays_own_rule_tells_every_trial_complete(tmp_path: Path) -> None:
    study, _ = _loop(tmp_path, "last")
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_failed_and_diverged_trials(tmp_path: Path) -> None:
    study, _ = _loop(tmp_path, "fidelity", n=4, fail="t0", diverge="t1")
    assert study.trials[0].state == TrialState.FAIL
    diverged = study.trials[1]
    assert diverged.state == TrialState.PRUNED
    assert diverged.intermediate_values[2] == 0.0  # the worst value, at the epoch it diverged
    assert not any(math.isnan(v) for t in study.trials for v in t.intermediate_values.values())


def _space(trial: optuna.Trial) -> None:
    trial.suggest_float("q", 0.0, 1.0)


def test_the_searcher_survives_rays_pickling_and_a_repeated_completion(tmp_path: Path) -> None:
    """Ray pickles the searcher into its experiment state and may complete a trial twice
    after a restore: the trial is told once, and a restored searcher keeps telling."""
    import pickle

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "j.journal")))
    s = FidelityOptunaSearch(space=_space, sampler=optuna.samplers.RandomSampler(seed=0),
                             metric="val_acc", mode="max", storage=storage, study_name="s",
                             max_t=MAX_T)
    s.suggest("a")
    s.on_trial_result("a", {"training_iteration": 1, "val_acc": 0.5})
    again = pickle.loads(pickle.dumps(s))
    done = {"training_iteration": 2, "val_acc": 0.4, "best_val_acc": 0.5}
    again.on_trial_complete("a", result=done)
    again.on_trial_complete("a", result=done)  # repeated: ignored
    again.suggest("b")
    again.on_trial_complete("b", result=None, error=True)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].intermediate_values == {1: 0.5, 2: 0.4}
