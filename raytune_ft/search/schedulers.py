"""Our Tune schedulers: ASHA whose rungs survive a driver crash, and snapshots of Ray's trial
table whenever a trial starts or ends. What they need of Ray's private state is in
:mod:`raytune_ft.search.ray_private`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from raytune_ft.search.ray_private import (
    asha_adopt,
    asha_assign,
    asha_bracket_count,
    asha_forget,
    asha_rungs,
    asha_settings,
    snapshot_at_step_end,
)


class SnapshotOnTrialEnd:
    """Scheduler mixin: Ray snapshots its trial table at the end of the controller step in which
    a trial starts, ends or fails.

    With only Ray's periodic snapshot (>= 10 s), a driver killed just after a trial ended would
    forget that, and a resume would run it again. Snapshotting at every controller step instead
    (~10 a second, TUNE_GLOBAL_CHECKPOINT_S=0) cost ~14 ms of driver CPU each: half the
    driver's CPU time in a search (bench/overhead.py --profile). Ray hands these hooks the
    controller (wrapped in on_trial_add); the flag is the one Ray's own checkpoint-count rule
    sets, honoured by the step's closing snapshot.
    """

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)  # type: ignore[misc]
        snapshot_at_step_end(tune_controller)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)  # type: ignore[misc]
        snapshot_at_step_end(tune_controller)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_error(tune_controller, trial)  # type: ignore[misc]
        snapshot_at_step_end(tune_controller)


class FIFO(SnapshotOnTrialEnd, FIFOScheduler):
    """Ray's FIFO scheduler (no early stopping), with snapshots when trials end."""


class PersistentASHA(SnapshotOnTrialEnd, ASHAScheduler):
    """ASHA whose rung records survive a driver crash, written append-only.

    Ray's `Tuner.restore` brings back the scheduler as it was pickled at the start, with empty
    rungs (ray#30838): after a resume, trials would be judged against nothing. This one appends
    every decision to `asha_decisions.jsonl` (trial, epoch, the metric's value in its own units,
    action: CONTINUE/STOP, COMPLETE when a trial ends, PROTECT for the baseline trial) and, on
    its first call after a restore, rebuilds the rungs by replaying that log through ASHA: the
    same results in the same order leave the same rungs, so a resumed search decides every
    later result as the uninterrupted one would. One short line per result, never a rewrite
    (a line cut short by a crash is dropped at the next start).

    With several brackets (`brackets=n`, Ray's argument), trials take turns: the k-th trial
    added goes to bracket k mod n, logged as an ADD line with its `bracket` before any of its
    results, so a replay puts every trial back in its bracket and rebuilds every bracket's
    rungs. (Ray draws the bracket from numpy's global RNG: a resume could not repeat that.)
    One bracket writes no ADD lines; a log without them is all bracket 0.

    Run folders written before this (rtft <= 0.1.0) also hold `asha_rungs.json`, a snapshot of
    the rungs; only its `protected` entry is still read, the log holds everything else.
    """

    LOG = "asha_decisions.jsonl"

    def __init__(self, run_dir: Path, protect_first: bool | int = False, *, time_attr: str,
                 metric: str, mode: str, max_t: int, **kwargs: Any) -> None:
        super().__init__(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t, **kwargs)
        self._run_dir = str(run_dir)
        self._t_attr, self._m_name, self._last_t = time_attr, metric, max_t
        self._sign = -1.0 if mode == "min" else 1.0  # how Ray stores values in its rungs
        self._loaded = False
        # The first trials are the enqueued default fine-tune and the warm start's earlier
        # best: references that run to max_t (True: the first one; n: the first n). Good
        # fine-tunes often start slowly (warmup, low LR): in the recorded pool the configs
        # within 0.5 pp of the best sit in the lower half at epoch 1 (bench/README.md), so a
        # rung at epoch 1 would judge them on the part of their curve that says least.
        self._protect_first = int(protect_first)
        self._protected: list[str] = []
        self._judged: set[tuple[str, Any, bool]] = set()  # (trial, epoch, COMPLETE?) logged
        # Ray's own count (its `brackets` argument), copied for on_trial_add's turns; set again
        # from Ray's pickled brackets on unpickling, so the two never disagree.
        self._n_brackets = asha_bracket_count(self)
        self._bracket_of: dict[str, int] = {}  # every trial added, with several brackets

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A scheduler pickled by rtft 0.1.0 lacks our own copies of its settings.
        self.__dict__.update(state)
        if not isinstance(state.get("_protected"), list):  # rtft 0.1.0: one id or None
            self._protected = [state["_protected"]] if state.get("_protected") else []
            self._protect_first = int(state.get("_protect_first", 0))
        self.__dict__.setdefault("_judged", set())
        self.__dict__.setdefault("_bracket_of", {})  # pickled before brackets: it had one
        self._n_brackets = asha_bracket_count(self)  # whatever the pickle held: Ray's count
        if "_t_attr" not in state:
            self._t_attr, self._m_name, mode, self._last_t = asha_settings(self)
            self._sign = -1.0 if mode == "min" else 1.0

    def relocate(self, run_dir: Path) -> None:
        """Write and read the decision log in `run_dir` from now on: a scheduler restored from
        a run folder that has moved since (its pickle names the folder it was written in)."""
        self._run_dir = str(run_dir)

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        run_dir = Path(self._run_dir)
        legacy = run_dir / "asha_rungs.json"
        if legacy.exists():
            old = json.loads(legacy.read_text()).get("protected")
            self._protected = [old] if old else []
        log = run_dir / self.LOG
        if not log.exists():
            return
        text = log.read_text()
        if text and not text.endswith("\n"):  # a line cut short by a crash mid-write:
            text = text[:text.rfind("\n") + 1]  # nothing was decided; the next line
            with open(log, "r+") as f:            # must start on a line of its own
                f.truncate(len(text.encode()))
        for line in text.splitlines():
            d = json.loads(line)
            self._judged.add((d["trial"], d["epoch"], d["action"] == "COMPLETE"))
            if d.get("protected") and d["trial"] not in self._protected:
                self._protected.append(d["trial"])
            if d["action"] == "PROTECT":
                continue
            if d["action"] == "ADD":
                self._bracket_of[d["trial"]] = d["bracket"]
                asha_assign(self, d["trial"], d["bracket"])
                continue
            asha_adopt(self, d["trial"], self._bracket_of.get(d["trial"], 0))
            result = {self._t_attr: d["epoch"], self._m_name: d["value"]}
            stub = _Replayed(d["trial"])
            if d["action"] == "COMPLETE":  # Ray's ASHA records a finished trial's last result
                ASHAScheduler.on_trial_complete(self, None, stub, result)
            else:
                ASHAScheduler.on_trial_result(self, None, stub, result)

    def _log(self, trial_id: str, epoch: Any, value: Any, action: str, **extra: Any) -> None:
        entry = {"trial": trial_id, "epoch": epoch, "value": value, "action": action, **extra}
        if trial_id in self._protected:
            entry["protected"] = True
        with open(Path(self._run_dir) / self.LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        if len(self._protected) < self._protect_first and trial.trial_id not in self._protected:
            self._protected.append(trial.trial_id)
            self._log(trial.trial_id, 0, None, "PROTECT")  # a restore must know it at once
        super().on_trial_add(tune_controller, trial)  # Ray's bracket draw is replaced below
        if self._n_brackets > 1:
            tid = trial.trial_id
            bracket = self._bracket_of.get(tid)  # known: a trial Ray adds again on a restore
            if bracket is None:
                bracket = self._bracket_of[tid] = len(self._bracket_of) % self._n_brackets
                self._log(tid, 0, None, "ADD", bracket=bracket)
            asha_assign(self, tid, bracket)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_once()
        # A trial restored after a crash may not have been re-added to a bracket.
        asha_adopt(self, trial.trial_id, self._bracket_of.get(trial.trial_id, 0))
        action = super().on_trial_result(tune_controller, trial, result)
        if trial.trial_id in self._protected and result.get(self._t_attr, 0) < self._last_t:
            action = "CONTINUE"  # recorded at the rung like any trial, but never stopped
        if self._t_attr in result and self._m_name in result:
            self._log_once(trial.trial_id, result[self._t_attr], result[self._m_name], action)
        return action

    def _log_once(self, trial_id: str, epoch: Any, value: Any, action: str) -> None:
        """Log a decision unless this trial's result at this epoch is logged already: a trial
        restarted after a crash from before its last checkpoint reports those epochs again,
        and ASHA, which records a trial once per rung, does not judge them again."""
        key = (trial_id, epoch, action == "COMPLETE")
        if key not in self._judged:
            self._judged.add(key)
            self._log(trial_id, epoch, value, action)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load_once()
        asha_adopt(self, trial.trial_id, self._bracket_of.get(trial.trial_id, 0))
        super().on_trial_complete(tune_controller, trial, result)
        if self._t_attr in result and self._m_name in result:
            self._log_once(trial.trial_id, result[self._t_attr], result[self._m_name],
                           "COMPLETE")

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        asha_forget(self, trial.trial_id)

    def rungs(self, bracket: int = 0) -> dict[float, dict[str, float]]:
        """{milestone: {trial_id: value}} of one bracket (the first by default), values in the
        metric's own units (Ray keeps them sign-flipped for mode=min), lowest milestone
        first. The last of several brackets may have no rung at all (all past max_t)."""
        self._load_once()
        return {float(m): {t: self._sign * v for t, v in rec.items()}
                for m, rec in sorted(asha_rungs(self, bracket))}

    @property
    def brackets(self) -> int:
        """How many brackets the trials take turns in."""
        return self._n_brackets

    def bracket_of(self, trial_id: str) -> int:
        """The bracket `trial_id` was put in (0 for every trial with one bracket)."""
        self._load_once()
        return self._bracket_of.get(trial_id, 0)


class _Replayed:
    """A trial as ASHA sees it when the log is replayed: only its id matters."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id
