"""Every place rtft reads or writes Ray's private state, in one file.

Checked against Ray 2.60 (the range pinned in pyproject.toml). Ray gives no public way to do
these things; each function says why it is needed. On a Ray upgrade, run
`pytest tests/search/test_ray_private.py`: it fails, naming this file, when an installed Ray
lacks an attribute used here.

- ASHA's rung records (`ASHAScheduler._brackets[s]._rungs`, `_trial_info`): Ray's
  `Tuner.restore` brings the scheduler back with empty rungs (ray#30838), so we persist them;
  and with several brackets Ray draws each trial's bracket from numpy's global RNG, which a
  resume cannot replay, so we assign brackets ourselves (round-robin) and log them.
- The controller's `_checkpoint_manager._should_force_sync_up` (and `_last_save_time`,
  `sync_up_experiment_state` to time it): snapshot Ray's trial table when a trial starts or
  ends, not on every controller step (bench/overhead.py --profile), and no more than 5 % of
  the driver's time (bench/load.py --bookkeeping).
- `TBXLoggerCallback._trial_writer`: write HParams listing every searched parameter (ray#40053).
- `OptunaSearch._ot_study`, `_ot_trials`, `_completed_trials`: tell Optuna how a trial really
  ended (PRUNED, COMPLETE with its best value: `raytune_ft.fidelity`); Ray tells every trial
  COMPLETE with its last value.
- `JobSubmissionClient._do_request`: the SDK's request helper (auth headers, cookies, TLS) for
  the dashboard's node list, which the Jobs SDK does not expose.
- `ray_constants.ENABLE_RAY_CLUSTER`: a local Ray whose node address is 127.0.0.1 binds its
  servers to loopback, but `ray.init` turns 127.0.0.1 into the machine's LAN address unless
  this flag (Ray's switch for single-machine Windows/macOS) is off while it starts.
- `ray_constants.LOG_PREFIX_ACTOR_NAME`: Ray sets an actor's log prefix once, when the actor is
  created; a Tune actor reused for trial after trial (`reuse_actors`) would keep its first
  trial's. (The dashboard's Actors "Repr" is also set once, and Ray 2.60 has no way to renew
  it: it stays the actor's first trial.)
- `ray.tune.trainable.wrap_function` and `ImplicitFunc.reset_config`: Tune's class for a
  function trainable, subclassed to give trials a name in logs and the dashboard and to
  rename a reused actor for each trial (`named_function_trainable`).
- `OptunaSearch`'s pickled state, adopted by our subclass (`adopt_optuna_search`): a run
  written by rtft 0.1.0 pickled Ray's own class.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Iterator
from typing import Any

CHECKED_RAY = ("2.60",)

# (class path, attribute, what it is) for tests/search/test_ray_private.py. Attributes set in
# __init__ are checked on an instance.
USED: tuple[tuple[str, str, str], ...] = (
    ("ray.tune.schedulers.ASHAScheduler", "_brackets", "instance"),
    ("ray.tune.schedulers.ASHAScheduler", "_trial_info", "instance"),
    ("ray.tune.schedulers.ASHAScheduler", "_time_attr", "instance"),
    ("ray.tune.schedulers.ASHAScheduler", "_metric", "instance"),
    ("ray.tune.schedulers.ASHAScheduler", "_mode", "instance"),
    ("ray.tune.schedulers.ASHAScheduler", "_max_t", "instance"),
    ("ray.tune.schedulers.async_hyperband._Bracket", "_rungs", "instance"),
    ("ray.tune.execution.tune_controller.TuneController", "_checkpoint_manager", "instance"),
    ("ray.tune.execution.experiment_state._ExperimentCheckpointManager",
     "_should_force_sync_up", "instance"),
    ("ray.tune.execution.experiment_state._ExperimentCheckpointManager",
     "_last_save_time", "instance"),
    ("ray.tune.execution.experiment_state._ExperimentCheckpointManager",
     "sync_up_experiment_state", "class"),
    ("ray.tune.logger.TBXLoggerCallback", "_trial_writer", "instance"),
    ("ray.tune.search.optuna.OptunaSearch", "_ot_study", "instance"),
    ("ray.tune.impl.tuner_internal.TunerInternal", "_tune_config", "init"),
    ("ray.tune.tuner.Tuner", "_local_tuner", "init"),
    ("ray.tune.impl.tuner_internal.TunerInternal", "_run_config", "init"),
    ("ray.train._internal.storage.StorageContext", "storage_fs_path", "init"),
    ("ray.tune.experiment.Experiment", "spec", "init"),
    ("ray.tune.search.SearchGenerator", "_experiment", "init"),
    ("ray.tune.search.optuna.OptunaSearch", "_ot_trials", "instance"),
    ("ray.tune.search.optuna.OptunaSearch", "_completed_trials", "instance"),
    ("optuna.storages.journal.JournalFileBackend", "_file_path", "init"),
    ("optuna.storages.JournalStorage", "_backend", "init"),
    ("ray.tune.logger.TBXLoggerCallback", "_try_log_hparams", "class"),
    ("ray.job_submission.JobSubmissionClient", "_do_request", "class"),
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER", "class"),
    ("ray._private.ray_constants", "LOG_PREFIX_ACTOR_NAME", "class"),
    ("ray.tune.trainable", "wrap_function", "class"),
    ("ray.tune.trainable.function_trainable.FunctionTrainable", "reset_config", "class"),
)


# ASHA -------------------------------------------------------------------------------------
def asha_rungs(scheduler: Any, bracket: int = 0) -> list[tuple[float, dict[str, float]]]:
    """ASHA's rungs of one bracket (the lowest by default): (milestone, {trial_id: recorded
    value}), as Ray keeps them (for mode=min Ray stores values sign-flipped: larger is always
    better)."""
    return scheduler._brackets[bracket]._rungs


def asha_adopt(scheduler: Any, trial_id: str, bracket: int = 0) -> None:
    """Make sure ASHA knows `trial_id` (in `bracket` if it does not): a trial restored after a
    crash may not have been re-added to a bracket, and Ray's ASHA raises on a trial it does
    not know."""
    scheduler._trial_info.setdefault(trial_id, scheduler._brackets[bracket])


def asha_bracket_count(scheduler: Any) -> int:
    """How many brackets ASHA has (Ray's `brackets` argument)."""
    return len(scheduler._brackets)


def asha_assign(scheduler: Any, trial_id: str, bracket: int) -> None:
    """Put `trial_id` in `bracket`, whatever Ray's `on_trial_add` drew for it (Ray draws from
    numpy's global RNG: neither reproducible nor replayable on a resume)."""
    scheduler._trial_info[trial_id] = scheduler._brackets[bracket]


def asha_settings(scheduler: Any) -> tuple[str, str, str, float]:
    """(time_attr, metric, mode, max_t) as ASHA keeps them: for a scheduler pickled by
    rtft 0.1.0, which did not keep its own copies."""
    return scheduler._time_attr, scheduler._metric, scheduler._mode, scheduler._max_t


def asha_forget(scheduler: Any, trial_id: str) -> None:
    """Drop `trial_id` from ASHA's bookkeeping (Ray's own on_trial_remove asserts it is there)."""
    scheduler._trial_info.pop(trial_id, None)


# OptunaSearch ------------------------------------------------------------------------------
def optuna_study(searcher: Any) -> Any:
    """The Optuna study behind Ray's OptunaSearch."""
    return searcher._ot_study


def optuna_trial(searcher: Any, trial_id: str) -> Any:
    """The Optuna trial Ray's OptunaSearch asked for Tune trial `trial_id`."""
    return searcher._ot_trials[trial_id]


def optuna_forget(searcher: Any, trial_id: str) -> None:
    """Drop a finished trial's Optuna handle. Ray's OptunaSearch keeps one per trial for the
    whole search and pickles them all into every experiment snapshot: memory and snapshot
    bytes that grow with the trials (bench/load.py --bookkeeping)."""
    searcher._ot_trials.pop(trial_id, None)


def optuna_completed(searcher: Any) -> set[str]:
    """The Tune trial ids OptunaSearch has already told Optuna about."""
    return searcher._completed_trials


def optuna_relocate_journal(searcher: Any, journal: str) -> None:
    """Point the study of a restored OptunaSearch at the journal file `journal`.

    Ray pickles the whole study, and with it Optuna's `JournalFileBackend`, which names the
    journal by its absolute path: a run folder moved since would read (or create) the journal
    at the old place. Unpickling reads nothing (the storage replays its journal lazily, on
    first use), so swapping the backend before any use is enough; every object of the study
    (its trials included) shares the one storage."""
    from optuna.storages.journal import JournalFileBackend

    storage = getattr(searcher._ot_study, "_storage", None)
    backend = getattr(storage, "_backend", None)
    if isinstance(backend, JournalFileBackend) and backend._file_path != journal:
        storage._backend = JournalFileBackend(journal)


def restored_search_alg(tuner: Any) -> Any:
    """The search algorithm of a restored Tuner, as given to TuneConfig (our searcher under
    Ray's ConcurrencyLimiter)."""
    return tuner._local_tuner._tune_config.search_alg


def restored_searcher(tuner: Any) -> Any:
    """The searcher inside a restored Tuner (under Ray's ConcurrencyLimiter, and under our
    RestoredSearchGenerator once wrapped), or None."""
    alg = tuner._local_tuner._tune_config.search_alg
    while hasattr(alg, "searcher"):
        alg = alg.searcher
    return alg


def replace_restored_search_alg(tuner: Any, search_alg: Any) -> None:
    """Give a restored Tuner another search algorithm (the restored one, wrapped)."""
    tuner._local_tuner._tune_config.search_alg = search_alg


def restored_storage(tuner: Any) -> Any:
    """Ray's StorageContext of a restored Tuner's experiment, where the run folder is now
    (`Tuner.restore` sets its run config's storage_path and name from the path it is given)."""
    from ray.train._internal.storage import StorageContext

    rc = tuner._local_tuner._run_config
    return StorageContext(storage_path=rc.storage_path, experiment_dir_name=rc.name,
                          storage_filesystem=rc.storage_filesystem)


def generator_experiment(generator: Any) -> Any:
    """The `Experiment` a SearchGenerator makes new trials from (None before one is added)."""
    return generator._experiment


def move_experiment(experiment: Any, storage: Any) -> None:
    """Point a restored `Experiment` (what Ray's SearchGenerator makes new trials from) at
    `storage`'s location, as Ray's `TuneController._restore_trials` does for restored trials
    (its storage copied, with the filesystem, path and experiment folder replaced)."""
    new = copy.copy(experiment.storage)
    new.storage_filesystem = storage.storage_filesystem
    new.storage_fs_path = storage.storage_fs_path
    new.experiment_dir_name = storage.experiment_dir_name
    experiment.storage = new
    experiment.spec["storage"] = new


def restored_scheduler(tuner: Any) -> Any:
    """The trial scheduler inside a restored Tuner."""
    return tuner._local_tuner._tune_config.scheduler


# Ray's experiment snapshots ---------------------------------------------------------------
# The share of the driver's time that snapshots forced at trial ends may take: Ray's own rule
# for its periodic snapshot (`_update_auto_checkpoint_time`: period = 19 x its duration).
SNAPSHOT_SHARE = 0.05
SNAPSHOT_CHEAP_S = 0.1  # a snapshot of a few thousand trials' state takes about this long


def snapshot_at_step_end(tune_controller: Any) -> None:
    """Ask Ray to snapshot its trial table at the end of the current controller step, unless
    snapshots would then take more than :data:`SNAPSHOT_SHARE` of the driver's time.

    A snapshot writes every trial's state (about 17 kB a trial in Ray 2.60), so one per trial
    end costs the driver time and bytes quadratic in the trials: 5 MB written per trial at 100
    trials (bench/load.py --bookkeeping). A snapshot is forced while one takes under
    SNAPSHOT_CHEAP_S, and past that only once the time since the last one is at least 19
    times what the last one took (measured here, by wrapping the
    manager's `sync_up_experiment_state` once). In a search of minutes-long trials that is
    every trial end, as before; with thousands of instant trials it is Ray's own period.
    The flag is the one Ray's checkpoint-count rule sets, honoured by the step's closing
    snapshot."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    manager = getattr(controller, "_checkpoint_manager", None)
    if manager is None or not hasattr(manager, "_should_force_sync_up"):
        return
    _time_snapshots(manager)
    took = getattr(manager, "_rtft_took", 0.0)
    since = time.monotonic() - getattr(manager, "_last_save_time", float("-inf"))
    # Under SNAPSHOT_CHEAP_S a snapshot is always taken (every trial start and end: a resumed
    # search neither loses a started trial nor re-runs an ended one); past it, the 5 % rule.
    if took < SNAPSHOT_CHEAP_S or since >= took * (1 / SNAPSHOT_SHARE - 1):
        manager._should_force_sync_up = True


def _time_snapshots(manager: Any) -> None:
    """Record on `manager` (as `_rtft_took`) how long each snapshot it writes takes."""
    sync_up = getattr(manager, "sync_up_experiment_state", None)
    if sync_up is None or getattr(sync_up, "rtft_timed", False):
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        out = sync_up(*args, **kwargs)
        if getattr(manager, "_last_save_time", float("-inf")) >= t0:  # it did write one
            manager._rtft_took = time.monotonic() - t0
        return out

    timed.rtft_timed = True  # type: ignore[attr-defined]
    manager.sync_up_experiment_state = timed


# TensorBoard ------------------------------------------------------------------------------
def tbx_file_writer(callback: Any, trial: Any) -> Any:
    """The tensorboardX file writer Ray's TBXLoggerCallback keeps for `trial`."""
    return callback._trial_writer[trial].file_writer


# Jobs API ---------------------------------------------------------------------------------
def job_client_get(client: Any, path: str) -> Any:
    """GET `path` on the dashboard with the Jobs SDK's own request helper."""
    return client._do_request("GET", path)


# A local Ray on loopback --------------------------------------------------------------------
@contextlib.contextmanager
def loopback_node() -> Iterator[dict[str, Any]]:
    """While a local Ray starts: the `ray.init` options that make its node address 127.0.0.1.

    Ray's gRPC servers (GCS, raylet, every worker and the driver), the dashboard agent and the
    metrics export bind to loopback only when the node address is a loopback address. But
    `ray.init(_node_ip_address="127.0.0.1")` replaces a loopback address with the machine's
    LAN address (`services.resolve_ip_for_localhost`) unless `ENABLE_RAY_CLUSTER` is off, which
    Ray itself does on Windows and macOS; it is read only while Ray works out its address."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield {"_node_ip_address": "127.0.0.1"}
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


# Names in Ray's logs and dashboard --------------------------------------------------------
def name_this_actor(name: str) -> None:
    """From now on, this actor's log lines read `(name pid=…)`: what Ray does once, when an
    actor is created, done again for the next trial of a reused actor. Ray's log monitor reads
    the prefix from a line of this form in the worker's stdout and stderr files."""
    from ray._private import ray_constants

    line = f"{ray_constants.LOG_PREFIX_ACTOR_NAME}{name}\n"
    for stream in (sys.stdout, sys.stderr):
        stream.write(line)
        stream.flush()


# Trials and searchers -----------------------------------------------------------------------
def named_function_trainable(fn: Any, name: str, rename: Any, module: str) -> type:
    """Tune's class for function trainable `fn` (`wrap_function`: `ImplicitFunc`), subclassed
    as `name` (its module `module`), shown as `rename(self)` (its `__repr__`, which Ray puts in
    the log prefix and the Actors tab), and renamed with :func:`name_this_actor` each time Tune
    reuses the actor for another trial (`reset_config`). Its trainable name stays `fn`'s."""
    from ray.tune.trainable import wrap_function

    base = wrap_function(fn)

    def reset_config(self: Any, new_config: dict) -> bool:
        ok = base.reset_config(self, new_config)
        if ok:
            name_this_actor(rename(self))
        return ok

    return type(name, (base,), {"__repr__": rename, "reset_config": reset_config,
                                "__module__": module, "__qualname__": name})


def adopt_optuna_search(searcher: Any, cls: type) -> bool:
    """Make a restored plain `OptunaSearch` an instance of its subclass `cls` (which adds no
    state of its own that the caller does not then set). True when it was adopted."""
    from ray.tune.search.optuna import OptunaSearch

    if type(searcher) is not OptunaSearch:
        return False
    searcher.__class__ = cls
    return True
