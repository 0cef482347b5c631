"""`run_search`: the steps of a search, top to bottom.

1. check everything that can be wrong with the input, before Ray or any file (`preflight`);
2. prepare what every trial shares: the pretrained backbone, the data;
3. lock the run folder, start or join Ray, check the cluster, write the run's spec;
4. run the Tuner (a new one, or one restored from the run folder);
5. write trials.json, upload run files, promote the best trial(s).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from raytune_ft import environment, portfolio, preflight, warm_start
from raytune_ft.data import Splits, data_record, prepare_each
from raytune_ft.distill import check_same_teacher, record_teacher, with_teacher_logits
from raytune_ft.errors import UserError
from raytune_ft.model.pretrain import ensure_backbone
from raytune_ft.promote import promote
from raytune_ft.run_folder import JOURNAL, check_resumable, open_run
from raytune_ft.runs import TUNE_DIR, Echo, RunLocation, TrialRecord, run_location, write_records
from raytune_ft.search.callbacks import FailureBudget, Progress, TensorBoard, UploadRunFiles
from raytune_ft.search.cluster import (
    check_cluster_fit,
    check_shared_storage,
    ensure_ray,
    job_metadata,
)
from raytune_ft.search.metrics import SearchMetrics
from raytune_ft.search.ray_private import (
    replace_restored_search_alg,
    restored_scheduler,
    restored_search_alg,
    restored_searcher,
    restored_storage,
)
from raytune_ft.search.records import load_records, records_from_results
from raytune_ft.search.schedulers import FIFO, PersistentASHA
from raytune_ft.search.searcher import FidelityOptunaSearch, RestoredSearchGenerator
from raytune_ft.search.storage import (
    download_run_files,
    localize_checkpoints,
    tune_exists,
    upload_run_files,
)
from raytune_ft.search.tracking import TrackingEvents, start_tracking
from raytune_ft.search.trainable import trainable_for
from raytune_ft.space import baseline_params, define_by_run, make_sampler
from raytune_ft.spec.schema import Spec
from raytune_ft.spec.yaml_io import load_spec, spec_to_yaml
from raytune_ft.tables import rung_summary, summary_table


@dataclass
class SearchOutcome:
    """What a finished search leaves: its folder, its trials, the promoted model folders."""

    run_dir: Path
    records: list[TrialRecord]
    promoted: list[Path] = field(default_factory=list)
    wall_s: float = 0.0


def print_line(line: str) -> None:
    """`run_search`'s default echo: print the line. Not `print` itself: the Tuner pickles the
    echo its callbacks hold, and Ray replaces `builtins.print` in the driver (tqdm_ray), which
    makes the original unpicklable by name."""
    print(line, flush=True)


def run_search(spec: Spec, *, address: str | None = None, echo: Echo = print_line,
               quiet: bool = False, resume: bool = False) -> SearchOutcome:
    """Run the whole search for `spec` and promote the best trial(s).

    `resume`: continue the interrupted run of the same name (finished trials are kept, running
    ones restart from their last checkpoint, the searcher and ASHA's rungs are restored).
    """
    t0 = time.monotonic()
    loc = run_location(spec)  # with an s3:// or gs:// storage_path: a local staging folder
    local = not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    # The same dry run as `rtft validate` (on this machine's resources when Ray starts here),
    # then what only a search does: pretrain, read all the data, load named weights.
    preflight.dry_run(spec, preflight.this_machine() if local else None, warm=False,
                      resume=resume)
    # The run folder next, before any work: a damaged one is refused at once.
    restore = _check_run_folder(spec, loc, resume, echo)
    if ray.is_initialized():  # a Ray this process already runs: ask it now, before any work
        check_cluster_fit(spec, None)
    ensure_backbone(spec, echo=echo)  # one per architecture of a model.arch choice
    by_size = prepare_each(spec)  # one per input size the architectures take
    splits = next(iter(by_size.values()))
    preflight.check_pretrained(spec, splits.num_classes)
    # The teacher (model.teacher) runs once, here; its logits travel with the splits.
    by_size = {size: with_teacher_logits(spec, s) for size, s in by_size.items()}
    splits = next(iter(by_size.values()))
    echo(f"data: {spec.data.source} — {len(splits.train_y)} train / {len(splits.val_y)} val / "
         f"{len(splits.test_y)} test (held out) images, {splits.num_classes} classes")
    # Read before anything is written: a bad warm-start source refuses the search here.
    warm = None if restore else warm_start.plan_for(spec, data=data_record(by_size))
    if not restore:  # the dry run skips it under --resume, which may find nothing to resume
        portfolio.plan_for(spec, warm=warm.enqueue if warm else ())
    created = preflight.first_missing(loc.local)  # removed again if the cluster refuses
    with _run_lock(loc.local):
        started = ensure_ray(address, echo, job_metadata(spec, loc))
        try:
            if not local:  # a cluster, or a Ray this process already runs: ask it
                check_cluster_fit(spec, created)
            if loc.remote is None:
                check_shared_storage(loc.local.parent, echo, created)
            _write_run_files(spec, loc, by_size, echo)
            tracker = start_tracking(spec, loc.local, echo)  # MLflow (track.mlflow), or None
            try:
                records = _fit(spec, loc, by_size, echo, quiet, restore, warm)
            except BaseException:
                if tracker is not None:  # its runs end KILLED; a resume reopens them
                    tracker.abort()
                raise
        finally:
            if started:
                ray.shutdown()
    try:
        write_records(loc.local, records)
        upload_run_files(loc)
        echo("")
        echo(f"{len(records)} trials: {rung_summary(records, spec)}")
        echo(summary_table(records, spec))
        promoted = _promote_found(spec, records, by_size, echo)
    except BaseException:
        if tracker is not None:
            tracker.abort()
        raise
    if tracker is not None:  # what the events missed, the run's files, the registry
        tracker.finish(records, promoted)
        upload_run_files(loc)  # mlflow.json as finish left it
    return SearchOutcome(loc.local, records, promoted, time.monotonic() - t0)


def _promote_found(spec: Spec, records: list[TrialRecord], by_size: dict[int, Splits],
                   echo: Echo) -> list[Path]:
    """Promote what the search found; a bound that no trial fits promotes nothing."""
    try:
        localize_checkpoints(records, spec)
        return promote(spec, records, by_size, echo=echo)
    except UserError as e:
        if not (e.field or "").startswith("promote.max_"):
            raise
        # The search went well and its trials are kept: a bound that none of them fits is
        # the answer, not a failure. `rtft promote RUN` (--pareto) can promote later.
        echo(f"no model promoted: {e}")
        return []


def promote_again(run_dir: Path, *, echo: Echo = print, pareto: bool = False) -> list[Path]:
    """`rtft promote RUN_DIR`: promote the best trial(s) of a finished run (again), from its
    own spec; the chosen checkpoints of an s3:// / gs:// run are downloaded first. `pareto`:
    every trial on the accuracy / latency front instead (`promote.promote`)."""
    spec = open_run(run_dir)
    records = localize_checkpoints(load_records(run_dir, spec), spec, pareto=pareto)
    # No splits given: promote reads the data at the input size of each trial it promotes.
    promoted = promote(spec, records, echo=echo, pareto=pareto)
    tracker = start_tracking(spec, Path(run_dir), echo)  # a new registry version each
    if tracker is not None:
        tracker.finish(None, promoted)
    return promoted


def _check_run_folder(spec: Spec, loc: RunLocation, resume: bool, echo: Echo) -> bool:
    """Whether to restore an existing run (True) or start a new one; refuses a new search over
    an existing run, and a resume with a spec other than the run's own."""
    exists = tune_exists(loc)
    if exists and not resume:
        raise UserError(f"a run named {spec.name!r} already exists in {loc.local.parent}; pass "
                        f"--resume to continue it, or --set name=... for a new run", field="name")
    if not exists:
        if resume and loc.remote is None and any(
                (loc.local / f).exists() for f in ("trials.json", JOURNAL)):
            # rtft's files without Ray's: a partial copy, not a run that never started
            raise UserError("no Ray experiment (tune/tuner.pkl): the run folder was partly "
                            "copied; copy tune/ again from the run", file=str(loc.tune_path))
        if resume:
            echo(f"nothing to resume in {loc.local}: starting a new run")
        return False
    download_run_files(loc)  # a resume on another machine: rtft's files from the URI
    check_resumable(loc.local, tune_here=loc.remote is None)
    saved = loc.local / "spec.yaml"
    if saved.exists() and _comparable(load_spec(saved)) != _comparable(spec):
        raise UserError(f"--resume with a spec that differs from the run's own {saved}; "
                        f"resume with that file", field="name")
    check_same_teacher(loc.local, spec)  # before the teacher runs and files are rewritten
    return True


def _comparable(spec: Spec) -> dict:
    """The spec without what may differ between two places the same run is opened from."""
    d = spec.model_dump(mode="json")
    d["run"].pop("storage_path")
    d["promote"].pop("dir")  # re-rooted with the run folder when it moved (run_folder)
    d.pop("track", None)  # where the search is also recorded changes none of its results
    return d


def _write_run_files(spec: Spec, loc: RunLocation, by_size: dict[int, Splits],
                     echo: Echo) -> None:
    run_dir = loc.local
    (run_dir / "spec.yaml").write_text(spec_to_yaml(spec))
    (run_dir / "data.json").write_text(json.dumps(data_record(by_size), indent=1))
    environment.write_run(run_dir, spec)  # what `rtft reproduce` compares against
    record_teacher(run_dir, spec, by_size)  # teacher.json: what `rtft reproduce` checks
    echo(f"results: {loc.root}" + (f"  (rtft's files staged in {run_dir})"
                                   if loc.remote else ""))
    echo(f"watch:   tensorboard --logdir {loc.root} --host 127.0.0.1")


def _fit(spec: Spec, loc: RunLocation, splits: dict[int, Splits], echo: Echo, quiet: bool,
         restore: bool, warm: warm_start.Plan | None) -> list[TrialRecord]:
    """Run Ray's Tuner to the end (a new one, or the run's own restored) and read its trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning (TPE options)
        if restore:
            echo("resuming: finished trials are kept, running ones restart from their "
                 "last checkpoint")
            tuner = tune.Tuner.restore(loc.tune_path, trainable=trainable_for(spec, splits),
                                       resume_unfinished=True, resume_errored=True)
            searcher = restored_searcher(tuner)
            FidelityOptunaSearch.adopt(searcher, spec.max_t)  # rtft 0.1.0 runs
            # The pickles name the folder the run was written in: a folder moved since goes on
            # here, and nothing is written at the old place.
            searcher.relocate(loc.local / "optuna.journal")
            replace_restored_search_alg(
                tuner, RestoredSearchGenerator(restored_search_alg(tuner), restored_storage(tuner)))
            scheduler = restored_scheduler(tuner)
            if isinstance(scheduler, PersistentASHA):
                scheduler.relocate(loc.local)
        else:
            tuner = _tuner(spec, loc, splits, echo, quiet, warm)
        results = tuner.fit()
    return records_from_results(results, spec.metric, spec.mode)


def _searcher(spec: Spec, run_dir: Path, echo: Echo,
              warm: warm_start.Plan | None) -> tuple[ConcurrencyLimiter, int]:
    """Optuna, through Ray, over the run's journal-backed study, and how many configurations
    a new study was given to try first (0 for a study that exists already).

    A new study gets the baseline first (`searcher.baseline_first`), then the warm start's
    configurations (`searcher.warm_start`), then the portfolio's (`searcher.portfolio`), and
    the warm start's observations if asked."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress lines say enough
    # The Optuna study lives in the run folder as an append-only journal: every ask and tell is
    # on disk at once, whatever happens to the driver.
    journal = run_dir / "optuna.journal"
    fresh = not journal.exists()
    storage = JournalStorage(JournalFileBackend(str(journal)))
    first = 0
    if fresh:
        # Ray ignores points_to_evaluate with a define-by-run space (ray#35319): enqueue in the
        # study itself, which OptunaSearch then loads.
        study = optuna.create_study(study_name=spec.name, storage=storage,
                                    direction="maximize" if spec.mode == "max" else "minimize")
        if spec.searcher.baseline_first:
            study.enqueue_trial(baseline_params(spec), skip_if_exists=True)
        if warm is not None:
            _warm_start(spec, study, warm, echo)
        # Checked by the dry run already; read again here, after the warm start, whose
        # configurations it is not to repeat.
        pf = portfolio.plan_for(spec, warm=warm.enqueue if warm else ())
        if pf is not None:
            for note in pf.notes:
                echo(note)
            for cfg in pf.enqueue:
                study.enqueue_trial(cfg, skip_if_exists=True)
            echo(f"portfolio ({pf.source}): {len(pf.enqueue)} configuration(s) next, each run "
                 f"to max_t")
        # Counted in the study, not added up: enqueue_trial skips a configuration it holds
        # already (a warm start's equal to the baseline), and ASHA must protect exactly these.
        first = len(study.get_trials(deepcopy=False,
                                     states=(optuna.trial.TrialState.WAITING,)))
    searcher = ConcurrencyLimiter(
        FidelityOptunaSearch(space=define_by_run(spec), sampler=make_sampler(spec),
                             metric=spec.metric, mode=spec.mode, storage=storage,
                             study_name=spec.name, max_t=spec.max_t,
                             telling=spec.searcher.telling),
        max_concurrent=spec.run.max_concurrent_trials)
    return searcher, first


def _warm_start(spec: Spec, study: Any, plan: warm_start.Plan, echo: Echo) -> None:
    """Enqueue the earlier runs' best configurations; add their trials as observations."""
    for note in plan.notes:
        echo(note)
    for cfg in plan.enqueue:
        study.enqueue_trial(cfg, skip_if_exists=True)
    for cfg, rec, max_t in plan.observations:
        study.add_trial(warm_start.frozen_trial(spec, cfg, rec, max_t))
    if plan.enqueue or plan.observations:
        echo(f"warm start: {len(plan.enqueue)} earlier configuration(s) first"
             + (f", {len(plan.observations)} earlier trial(s) as observations"
                if plan.observations else ""))


def _tuner(spec: Spec, loc: RunLocation, splits: dict[int, Splits], echo: Echo, quiet: bool,
           warm: warm_start.Plan | None) -> tune.Tuner:
    searcher, protect = _searcher(spec, loc.local, echo, warm)
    sch = spec.scheduler
    # metric/mode go to the searcher and scheduler themselves: Ray does not pass TuneConfig's
    # through a ConcurrencyLimiter.
    # The baseline, the warm start's and the portfolio's configurations are the study's first
    # trials: they run to max_t (on a resume the scheduler's own log says which trials those
    # were). With several brackets, trials take turns in them (logged: a resume keeps them).
    scheduler = (PersistentASHA(loc.local, protect_first=protect,
                                time_attr="training_iteration", max_t=spec.max_t,
                                metric=spec.metric, mode=spec.mode,
                                grace_period=sch.grace_period,
                                reduction_factor=sch.reduction_factor, brackets=sch.brackets)
                 if sch.type == "asha" else FIFO())
    budget = FailureBudget(spec.run.max_failed_trials, echo)
    uploads = [UploadRunFiles(loc)] if loc.remote else []
    return tune.Tuner(
        trainable_for(spec, splits),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler,
            num_samples=spec.run.num_samples,
            # One worker process serves trial after trial: no process start and no re-import
            # of torch per trial. run_trial sets every piece of per-trial process state
            # (threads, seeds, cuDNN, logging) itself and frees GPU memory on OOM.
            reuse_actors=True,
            trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=loc.remote or str(loc.local),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=spec.run.checkpoints_to_keep,
                # Ranked by best-so-far: a trial's checkpoint holds the best epoch's weights
                # beside its latest state (train.py), so its latest is its best.
                checkpoint_score_attribute=f"best_{spec.metric}",
                checkpoint_score_order=spec.mode),
            failure_config=tune.FailureConfig(max_failures=spec.run.max_failures),
            # A reporter of our own (which reports nothing at verbose 0): in a notebook, Tune's
            # default one clears the cell's output when it starts, the start lines with it.
            verbose=0, stop=budget, progress_reporter=tune.CLIReporter(),
            callbacks=[Progress(spec, echo, quiet), TensorBoard(spec), budget,
                       SearchMetrics(spec), *uploads,
                       *([TrackingEvents(spec.name)] if spec.track.mlflow else [])]),
    )


# Functions of this module, not lambdas: Ray keeps both in every trial's saved state, where a
# lambda is pickled by value (2.4 kB a trial) and these by name.
def trial_name(trial: Any) -> str:
    """A trial's name in Ray's tables: its id."""
    return trial.trial_id


def trial_dirname(trial: Any) -> str:
    """A trial's folder under the run's `tune/`: `trial_<id>`."""
    return f"trial_{trial.trial_id}"


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One search per run folder at a time: a second one is refused, never interleaved."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".rtft.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"the run {run_dir} is in use by another rtft search ({holder}); "
                            f"wait for it, or choose another name with --set name=...",
                            field="name") from e
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


