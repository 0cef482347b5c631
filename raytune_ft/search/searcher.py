"""The searcher: Ray's OptunaSearch, telling Optuna how each trial really ended.

The rule (COMPLETE with the best-so-far value at `max_t`, PRUNED when stopped early or
diverged, FAIL on an error) is :func:`raytune_ft.fidelity.tell`; this class only applies it.
Intermediate values (one per epoch) are Ray's own `on_trial_result`; the last result of a
stopped trial reaches the searcher only through `on_trial_complete`, so it is reported there.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from raytune_ft.fidelity import finite, tell
from raytune_ft.search.ray_private import (
    adopt_optuna_search,
    generator_experiment,
    move_experiment,
    optuna_completed,
    optuna_forget,
    optuna_relocate_journal,
    optuna_study,
    optuna_trial,
)

STEP = "training_iteration"


class FidelityOptunaSearch(OptunaSearch):
    """OptunaSearch whose trials end PRUNED, COMPLETE or FAIL by :func:`fidelity.tell`.

    `max_t`: the epoch at which a trial has trained in full. `telling="last"` keeps Ray's own
    rule (COMPLETE with the last reported value), for comparison (bench/efficiency.py).
    """

    def __init__(self, *args: Any, max_t: int, telling: str = "fidelity", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_t = max_t
        self._telling = telling

    @classmethod
    def adopt(cls, searcher: Any, max_t: int) -> None:
        """Give a plain OptunaSearch restored from a run written by rtft 0.1.0 this class's
        guards, keeping Ray's telling (`last`) that the run started with. Ray's own class
        fails the whole search when Optuna refuses an intermediate value on resume (a trial
        told before the driver died)."""
        if adopt_optuna_search(searcher, cls):
            searcher._max_t, searcher._telling = max_t, "last"

    def relocate(self, journal: Path) -> None:
        """Read and write the Optuna journal at `journal` from now on, and after any later
        `restore` of Ray's searcher state: the pickled study names the journal where the run
        was written, and a run folder that moved must go on in its own journal (not create or
        append to one at the old place)."""
        self._rtft_journal = str(journal)
        optuna_relocate_journal(self, self._rtft_journal)

    def restore(self, checkpoint_path: str) -> None:
        journal = getattr(self, "_rtft_journal", None)
        super().restore(checkpoint_path)  # replaces every attribute with the pickled ones
        if journal is not None:
            self.relocate(Path(journal))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not finite(result.get(self.metric)):  # Optuna refuses to rank on NaN/inf
            return
        try:
            super().on_trial_result(trial_id, result)
        except Exception:  # e.g. a trial told already before a crash: never fail the trial
            logging.getLogger(__name__).warning("could not report %s to Optuna", trial_id,
                                                exc_info=True)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if self._telling == "last":
            super().on_trial_complete(trial_id, result=result, error=error)
            optuna_forget(self, trial_id)
            return
        if trial_id in optuna_completed(self):
            return  # told already (Ray repeats a completion after some restores)
        told = tell(result, error=error, metric=self.metric, max_t=self._max_t)
        # Never turn a finished trial into a failed one over the searcher's bookkeeping: a
        # trial told just before a driver crash is finished in the journal on resume.
        try:
            trial = optuna_trial(self, trial_id)
            if result and finite(result.get(STEP)) and finite(result.get(self.metric)):
                with warnings.catch_warnings():  # "already reported": it ran to the end
                    warnings.simplefilter("ignore")
                    trial.report(result[self.metric], int(result[STEP]))  # the last epoch
            optuna_study(self).tell(trial, told.value, state=TrialState[told.state])
        except Exception:
            logging.getLogger(__name__).warning("could not tell Optuna about %s", trial_id,
                                                exc_info=True)
        optuna_completed(self).add(trial_id)
        optuna_forget(self, trial_id)  # told: nothing asks for it again


class RestoredSearchGenerator(SearchGenerator):
    """Ray's SearchGenerator for a resumed run, whose restored state is moved to where the run
    folder is now.

    Ray's snapshot of the generator holds the run's `Experiment`, whose storage names the
    folder the run was written in: restored as it is, every trial created after a resume of
    a moved run folder writes its results there ("Unable to set up cluster storage", or files
    at the old place). Ray moves the restored trials themselves (`_restore_trials`); this
    does the same for the experiment new trials are made from. `storage`: Ray's
    StorageContext of the restored Tuner (`ray_private.restored_storage`)."""

    def __init__(self, searcher: Any, storage: Any) -> None:
        super().__init__(searcher)
        self._rtft_storage = storage

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        experiment = generator_experiment(self)
        if experiment is not None:
            move_experiment(experiment, self._rtft_storage)
