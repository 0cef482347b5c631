"""The search: Ray Tune runs our trainer, Optuna samples, ASHA stops weak trials early.

This is the only module (with job submission) that imports Ray. It prepares what every trial
shares (the data, put once into Ray's object store; the pretrained backbone), starts or joins
Ray, runs the Tuner, turns Ray's ResultGrid into plain :class:`TrialRecord` s, and promotes.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from raytune_ft.data import Splits, prepare
from raytune_ft.models import absolute_weights, build_model, cache_dir, resolve_weights
from raytune_ft.pretrain import ensure_backbone
from raytune_ft.promote import (
    TrialRecord,
    choose,
    fmt,
    promote,
    ranked,
    text_table,
    trial_state,
    trial_table,
)
from raytune_ft.space import baseline_params, define_by_run, hparams_for, make_sampler
from raytune_ft.spec import Hyperparams, Spec, SpecError, check_fit, load_spec, spec_to_yaml
from raytune_ft.train import train

__all__ = ["SearchOutcome", "load_records", "preflight", "rung_summary", "run_search",
           "summary_rows", "summary_table"]

Echo = Callable[[str], None]
# Ray's experiment folder inside our run folder. Ray re-uploads its own folder from a staging
# copy at every snapshot, which would roll back files we keep there (the Optuna journal, ASHA's
# rungs) to their state at restore: ours live beside it, never inside.
TUNE_DIR = "tune"
# Per-epoch metrics kept in TrialRecord.history (Ray adds many bookkeeping columns).
_HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_acc", "best_val_acc", "best_val_loss",
                 "lr", "images_per_s", "diverged", "time_total_s", "timestamp")


@dataclass
class SearchOutcome:
    run_dir: Path
    records: list[TrialRecord]
    promoted: list[Path] = field(default_factory=list)
    wall_s: float = 0.0


# --------------------------------------------------------------------------------------------
# The trainable: runs in a Ray worker, calls our plain trainer.
# --------------------------------------------------------------------------------------------
class TrialOOMError(RuntimeError):
    """CUDA ran out of memory in a trial; the message names the batch size."""


def _trainable(config: dict[str, Any], spec_json: dict, data: Splits) -> None:
    for name in ("ray.train", "ray.tune"):  # one "checkpoint created" line per epoch is noise
        logging.getLogger(name).setLevel(logging.WARNING)
    spec = Spec.model_validate(spec_json)
    hp = hparams_for(spec, config)
    threads = max(1, int(spec.run.resources.cpu))

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        ckpt = tune.Checkpoint.from_directory(str(folder)) if folder else None
        tune.report(metrics, checkpoint=ckpt)

    checkpoint = tune.get_checkpoint()
    report = _inject_faults(report, checkpoint)  # a no-op unless RTFT_TEST_FAULTS is set
    try:
        if checkpoint is None:
            train(hp, spec=spec, data=data, report=report, num_threads=threads)
            return
        with checkpoint.as_directory() as folder:  # a retried trial resumes where it stopped
            train(hp, spec=spec, data=data, report=report, num_threads=threads,
                  resume_from=folder)
    except torch.cuda.OutOfMemoryError:
        pass  # handled below: out here the traceback no longer pins the trial's tensors
    else:
        return
    # Free this trial's GPU memory before the error reaches Ray, so the next trial on this
    # GPU (possibly in this same worker) starts clean (ray#23971).
    gc.collect()
    torch.cuda.empty_cache()
    raise TrialOOMError(f"CUDA out of memory with batch_size {hp.batch_size}; try a smaller "
                        f"batch or fewer trials per GPU (run.resources.gpu)")


# Test-only fault injection (tests/test_hardening.py), off unless RTFT_TEST_FAULTS names a
# folder: the first trial to start claims it, dies after its first checkpoint, and on its retry
# finds that checkpoint truncated on disk, as a crash mid-write or a failing disk leaves it.
_FAULTS_ENV = "RTFT_TEST_FAULTS"


def _inject_faults(report: Callable[..., None], checkpoint: Any) -> Callable[..., None]:
    folder = os.environ.get(_FAULTS_ENV)
    if not folder:
        return report
    trial_id = tune.get_context().get_trial_id()
    claim = Path(folder) / "victim"
    if checkpoint is None:
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return report  # another trial is the victim
        os.write(fd, trial_id.encode())
        os.close(fd)

        def crash_after(metrics: dict[str, Any], ckpt: Path | None) -> None:
            report(metrics, ckpt)
            raise RuntimeError(f"injected crash after epoch {metrics['epoch']} ({_FAULTS_ENV})")

        return crash_after
    if claim.exists() and claim.read_text() == trial_id:  # the retry: truncate what it resumes
        state = Path(checkpoint.path) / "state.pt"
        with open(state, "r+b") as f:
            f.truncate(state.stat().st_size // 2)
    return report


# --------------------------------------------------------------------------------------------
# Callbacks: compact progress lines, and TensorBoard with an honest HParams table.
# --------------------------------------------------------------------------------------------
class _Progress(tune.Callback):
    """Progress as people and logs want it.

    On a terminal: a compact table of the running trials (params, epoch, metric) redrawn in
    place, with one permanent line per finished trial above it. Elsewhere (CI, batch logs):
    one line per trial start, epoch and end. `quiet` keeps only the finished-trial lines.
    """

    def __init__(self, spec: Spec, echo: Echo, quiet: bool, live: bool | None = None) -> None:
        self.spec, self.echo, self.quiet, self.t0 = spec, echo, quiet, time.monotonic()
        self.live = (not quiet) and (sys.stdout.isatty() if live is None else live)
        self.done = 0
        self.rows: dict[str, dict[str, Any]] = {}
        self.drawn = 0  # lines of the live table currently on screen

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:5.0f}s]"

    def _clear(self) -> None:
        if self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")  # cursor up, clear to the end
            self.drawn = 0

    def _redraw(self) -> None:
        if not self.live:
            return
        self._clear()
        m, names = self.spec.metric, [n for n, p in self.spec.search.items()
                                      if p.space != "fixed"]
        head = ["trial", "epoch", m, "best", *names]
        body = [[tid, f"{r['epoch']}/{self.spec.max_t}", r["value"], r["best"],
                 *[fmt(r["params"].get(n)) for n in names]]
                for tid, r in self.rows.items()]
        lines = [f"{self._stamp()} {len(self.rows)} running, {self.done}/"
                 f"{self.spec.run.num_samples} done", *text_table(head, body, rule=False)]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self.drawn = len(lines)

    def _line(self, text: str, *, always: bool = False) -> None:
        if self.quiet and not always:
            return
        self._clear()
        self.echo(f"{self._stamp()} {text}")
        self._redraw()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.rows[trial.trial_id] = {"epoch": 0, "value": "-", "best": "-",
                                     "params": dict(trial.config)}
        if self.live:
            self._redraw()
            return
        params = " ".join(f"{k}={fmt(v)}" for k, v in trial.config.items())
        self._line(f"{trial.trial_id} start  {params}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        m = self.spec.metric
        value, best = result.get(m, float("nan")), result.get("best_" + m, float("nan"))
        if trial.trial_id in self.rows:
            self.rows[trial.trial_id].update(epoch=result.get("epoch"), value=f"{value:.4f}",
                                             best=f"{best:.4f}")
        if self.live:
            self._redraw()
            return
        running = sum(1 for t in trials if t.status == "RUNNING")
        self._line(f"{trial.trial_id} epoch {result.get('epoch')}/{self.spec.max_t}  "
                   f"{m} {value:.4f}  best {best:.4f}  "
                   f"{result.get('images_per_s', 0):.0f} img/s  ({running} running, "
                   f"{self.done}/{self.spec.run.num_samples} done)")

    def _end(self, trial: Any, how: str) -> None:
        self.done += 1
        self.rows.pop(trial.trial_id, None)
        r = trial.last_result or {}
        m = self.spec.metric
        self._line(f"{trial.trial_id} {how} after epoch {r.get('epoch', 0)}: best {m} "
                   f"{r.get('best_' + m, float('nan')):.4f}  [{self.done}/"
                   f"{self.spec.run.num_samples}]", always=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        if r.get("diverged"):
            how = "DIVERGED (NaN/inf loss)"
        elif r.get("epoch", 0) < self.spec.max_t:
            how = "stopped by ASHA"
        else:
            how = "completed"
        self._end(trial, how)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._clear()


class _FailureBudget(tune.Callback, tune.Stopper):
    """Ends the whole search once `run.max_failed_trials` trials have failed."""

    def __init__(self, limit: int | None, echo: Echo) -> None:
        self.limit, self.echo, self.failed = limit, echo, 0

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        if self.limit is not None and self.failed == self.limit:
            self.echo(f"{self.failed} trials failed (run.max_failed_trials = {self.limit}): "
                      f"ending the search; see `rtft results` for their errors")

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.limit is not None and self.failed >= self.limit


class _TensorBoard(TBXLoggerCallback):
    """Ray's TensorBoard logger (scalars under ray/tune/ per trial), with HParams that list
    every searched parameter for every trial: a parameter inactive in a trial (`momentum`
    with adamw) is logged as "n/a" instead of silently missing (ray#40053)."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self._spec = spec

    def _try_log_hparams(self, trial: Any, result: dict) -> None:
        from tensorboardX.summary import hparams

        params: dict[str, Any] = {}
        for name in self._spec.search:
            params[name] = trial.config.get(name, "n/a")
        keep = ("val_acc", "val_loss", "train_loss", f"best_{self._spec.metric}")
        metrics = {k: v for k, v in result.items() if k.split("/")[-1] in keep}
        try:
            for summary in hparams(hparam_dict=params, metric_dict=metrics):
                self._trial_writer[trial].file_writer.add_summary(summary)
        except Exception:  # never let logging kill a search
            logging.getLogger(__name__).exception("could not write TensorBoard hparams")


class _SnapshotOnTrialEnd:
    """Scheduler mixin: Ray snapshots its trial table at the end of the controller step in which
    a trial starts, ends or fails.

    With only Ray's periodic snapshot (>= 10 s), a driver killed just after a trial ended would
    forget that, and a resume would run it again. Snapshotting at every controller step instead
    (~10 a second, TUNE_GLOBAL_CHECKPOINT_S=0) cost ~14 ms of driver CPU each: half the
    driver's CPU time in a search (bench/overhead.py --profile). Ray hands these hooks the
    controller (wrapped in on_trial_add); the flag is the one Ray's own checkpoint-count rule
    sets, honoured by the step's closing snapshot.
    """

    @staticmethod
    def _snapshot_at_step_end(tune_controller: Any) -> None:
        controller = getattr(tune_controller, "_tune_controller", tune_controller)
        manager = getattr(controller, "_checkpoint_manager", None)
        if manager is not None and hasattr(manager, "_should_force_sync_up"):
            manager._should_force_sync_up = True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)  # type: ignore[misc]
        self._snapshot_at_step_end(tune_controller)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)  # type: ignore[misc]
        self._snapshot_at_step_end(tune_controller)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_error(tune_controller, trial)  # type: ignore[misc]
        self._snapshot_at_step_end(tune_controller)


class _FIFO(_SnapshotOnTrialEnd, FIFOScheduler):
    """Ray's FIFO scheduler (no early stopping), with snapshots when trials end."""


class _PersistentASHA(_SnapshotOnTrialEnd, ASHAScheduler):
    """ASHA whose rung records survive a driver crash.

    Ray's `Tuner.restore` brings back the scheduler as it was pickled at the start, with empty
    rungs (ray#30838): after a resume, trials would be judged against nothing. This one writes
    its rungs to the run folder after every decision (atomically) and reads them back on its
    first call after a restore. Every decision is also appended to `asha_decisions.jsonl`.
    """

    def __init__(self, run_dir: Path, protect_first: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._run_dir = str(run_dir)
        self._loaded = False
        # The first trial is the enqueued default fine-tune: a reference that runs to max_t.
        # A full fine-tune starts slowly (warmup, low LR), so a rung at epoch 1 would judge it
        # on the part of its curve that says least.
        self._protect_first = protect_first
        self._protected: str | None = None

    def _bracket(self) -> Any:
        return self._brackets[0]

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self._run_dir) / "asha_rungs.json"
        if path.exists():
            saved = json.loads(path.read_text())
            self._protected = saved.pop("protected", None)
            saved = {float(m): rec for m, rec in saved.items()}
            for milestone, recorded in self._bracket()._rungs:
                recorded.update(saved.get(float(milestone), {}))

    def _save(self, trial: Any, result: dict, action: str) -> None:
        rungs: dict[str, Any] = {str(m): rec for m, rec in self._bracket()._rungs}
        rungs["protected"] = self._protected
        path = Path(self._run_dir) / "asha_rungs.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rungs))
        os.replace(tmp, path)
        with open(Path(self._run_dir) / "asha_decisions.jsonl", "a") as f:
            f.write(json.dumps({"trial": trial.trial_id, "epoch": result.get(self._time_attr),
                                "value": result.get(self._metric), "action": action}) + "\n")

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        if self._protect_first and self._protected is None:
            self._protected = trial.trial_id
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_once()
        # A trial restored after a crash may not have been re-added to a bracket.
        self._trial_info.setdefault(trial.trial_id, self._bracket())
        action = super().on_trial_result(tune_controller, trial, result)
        if trial.trial_id == self._protected and result.get(self._time_attr, 0) < self._max_t:
            action = "CONTINUE"  # recorded at the rung like any trial, but never stopped
        self._save(trial, result, action)
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load_once()
        self._trial_info.setdefault(trial.trial_id, self._bracket())
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._trial_info.pop(trial.trial_id, None)


# --------------------------------------------------------------------------------------------
# Ray and the Tuner
# --------------------------------------------------------------------------------------------
# Our own progress lines replace Ray's tables; Ray's warning about checkpoint-driven state
# snapshots fires on every epoch of small trials and says nothing actionable.
# Ray snapshots its trial table every >= 10 s by default, and after each trial checkpoint;
# our schedulers add one whenever a trial starts, ends or fails (_SnapshotOnTrialEnd).
_RAY_ENV = {"RAY_AIR_NEW_OUTPUT": "0",
            "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def _ensure_ray(address: str | None, echo: Echo) -> bool:
    """Join `address` (or $RAY_ADDRESS), or start a local Ray; True when we started it.

    `auto` and `host:6379` join as a driver (on a cluster node, or inside a Ray job);
    `ray://host:10001` joins through Ray Client (the Tune loop then runs on the head node, so
    run.storage_path must be storage both sides see). `http://head:8265` is the Jobs API,
    which ray.init cannot join: `rtft search --address http://…` submits a job instead.
    """
    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if address.startswith(("http://", "https://")):
            raise SpecError(f"{address} is the cluster's dashboard / Jobs API, which a driver "
                            f"cannot join; allowed: `rtft submit SPEC --address {address}` (or "
                            f"`rtft search --address {address}`, which submits a job), 'auto' "
                            f"or host:6379 on a cluster node, ray://host:10001 (Ray Client)")
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = (" The cluster uses token authentication: set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token); Ray sends the "
                    "token to an explicit address only then." if "uthenticat" in str(e) else "")
            raise SpecError(f"cannot join the Ray cluster at {address}: {first}.{hint}") from None
        echo(f"connected to Ray at {address}"
             + (" (Ray Client: the search loop runs on the head node)"
                if address.startswith("ray://") else ""))
        return True
    ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1",
                   logging_level=logging.WARNING, configure_logging=True)
    url = getattr(ctx, "dashboard_url", None)
    if url:
        echo(f"Ray dashboard: http://{url}  (bound to 127.0.0.1)")
    return True


def cluster_resources(address: str, headers: Any = None) -> dict[str, float]:
    """Total CPU and GPU of the Ray cluster at `address` (auto, host:6379, ray://…), joined
    briefly as a driver. (`headers` is for the http:// variant in jobs.py; unused here.)"""
    started = _ensure_ray(address, lambda _line: None)
    try:
        total = ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
    return {"CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0))}


# --------------------------------------------------------------------------------------------
# Storage: a local folder (shared by every node on a cluster), or an s3:// / gs:// URI
# --------------------------------------------------------------------------------------------
# rtft's own run files. With a URI storage_path they are written to a local staging folder on
# the driver's machine (the Optuna journal is appended on every ask and tell, ASHA's rungs are
# rewritten on every decision: too chatty for object storage) and uploaded to the run's URI
# after every finished trial and at the end. Ray writes its experiment (checkpoints, results,
# TensorBoard files) to the URI itself, from the node each trial runs on.
_RUN_FILES = ("spec.yaml", "data.json", "trials.json", "optuna.journal", "asha_rungs.json",
              "asha_decisions.jsonl")


def _is_uri(path: str) -> bool:
    return "://" in path


@dataclass(frozen=True)
class RunLocation:
    """Where a run lives: `local` holds rtft's files (the run folder itself, or with a URI
    storage_path its staging copy); `remote` is the run's URI (s3://bucket/prefix/<name>)."""

    local: Path
    remote: str | None = None

    @property
    def root(self) -> str:
        """The run folder as the user named it: a path, or a URI."""
        return self.remote or str(self.local)

    @property
    def tune_path(self) -> str:
        """Ray's experiment folder (or URI)."""
        return f"{self.root}/{TUNE_DIR}"


def run_location(spec: Spec) -> RunLocation:
    """The run folder of `spec`; for a URI storage_path, its local staging folder under the
    rtft cache ($RTFT_CACHE/staging/<hash of the URI>/<name>) and the URI."""
    storage = spec.run.storage_path
    if _is_uri(storage):
        remote = f"{storage.rstrip('/')}/{spec.name}"
        digest = hashlib.sha1(remote.encode()).hexdigest()[:12]
        return RunLocation(cache_dir() / "staging" / digest / spec.name, remote)
    return RunLocation(Path(storage).expanduser().resolve() / spec.name)


def _fs(uri: str) -> tuple[Any, str]:
    """pyarrow filesystem and path for a URI (endpoint and credentials from the environment:
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, … for S3 and S3-compatible stores such as MinIO)."""
    import pyarrow
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        raise SpecError(f"cannot open {uri}: {e}; allowed: s3://bucket/prefix or "
                        f"gs://bucket/prefix, with credentials (and for MinIO-like stores "
                        f"AWS_ENDPOINT_URL) in the environment", field="run.storage_path") from None


def _exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:  # no such bucket, no access: say so before anything runs
        raise SpecError(f"cannot read {uri}: {e}", field="run.storage_path") from None


def _tune_exists(loc: RunLocation) -> bool:
    if loc.remote is None:
        return (loc.local / TUNE_DIR / "tuner.pkl").exists()
    return _exists(f"{loc.tune_path}/tuner.pkl")


def _upload_run_files(loc: RunLocation) -> None:
    """Copy rtft's run files from the staging folder to the run's URI (no-op for a path)."""
    if loc.remote is None:
        return
    import pyarrow.fs as pafs

    fs, root = _fs(loc.remote)
    for name in _RUN_FILES:
        src = loc.local / name
        if src.exists():
            pafs.copy_files(str(src), f"{root}/{name}", destination_filesystem=fs)


def _download_run_files(loc: RunLocation) -> None:
    """Fetch the run files that the staging folder lacks (a resume on another machine). Files
    already here are kept: they are at least as new as the uploaded ones."""
    if loc.remote is None:
        return
    import pyarrow.fs as pafs

    fs, root = _fs(loc.remote)
    loc.local.mkdir(parents=True, exist_ok=True)
    for name in _RUN_FILES:
        dst = loc.local / name
        if not dst.exists() and fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File:
            pafs.copy_files(f"{root}/{name}", str(dst), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())


def _localize_checkpoints(records: list[TrialRecord], loc: RunLocation) -> None:
    """Download the checkpoints promotion will read (only those) into the staging folder."""
    import pyarrow.fs as pafs

    for rec in records:
        if rec.best_checkpoint and _is_uri(rec.best_checkpoint):
            fs, path = _fs(rec.best_checkpoint)
            dst = loc.local / "checkpoints" / f"trial_{rec.trial_id}" / Path(path).name
            if not dst.exists():
                tmp = dst.with_name(dst.name + ".part")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)  # pyarrow copies into the folder, creating no parents
                pafs.copy_files(path, str(tmp), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                os.replace(tmp, dst)
            rec.best_checkpoint = str(dst)


def localize_checkpoints(records: list[TrialRecord], spec: Spec) -> list[TrialRecord]:
    """`records`, with the checkpoints promotion would read downloaded from an s3:// / gs://
    run (to its staging folder); unchanged for a run on a path."""
    if _is_uri(spec.run.storage_path):
        _localize_checkpoints(choose(records, spec.metric, spec.promote.top_k),
                              run_location(spec))
    return records


class _UploadRunFiles(tune.Callback):
    """After each finished trial, upload rtft's run files to the run's URI (a few small files;
    Ray uploads its own experiment state itself)."""

    def __init__(self, loc: RunLocation) -> None:
        self.loc = loc

    def _upload(self) -> None:
        try:
            _upload_run_files(self.loc)
        except Exception:  # a failed upload is retried next time; never end the search on it
            logging.getLogger(__name__).exception("could not upload run files to %s",
                                                  self.loc.remote)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._upload()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._upload()


def _read_probe(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_shared_storage(root: Path, echo: Echo, created: Path | None = None,
                         timeout_s: float = 120.0) -> None:
    """On a cluster with more than one alive node, prove that the local storage path `root`
    is the same storage on every node: write a token file here and read it back with a tiny
    task pinned to each node. Raises SpecError (run.storage_path) naming the nodes that cannot,
    after removing `created` (the folders this run created).

    Since Ray 2.7, each trial writes its checkpoints to storage_path from the node it runs on
    and nothing is synced to the head node; with a node-local path the checkpoints end up
    scattered over the nodes and restore/promotion cannot find them, and the old failure was
    confusing (ray issue 37177). So a local path must be shared (NFS, …), or use a URI.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = root / f".rtft-shared-check-{token}"
    probe.write_text(token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        refs = {n["NodeID"]: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe)) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        names = {n["NodeID"]: f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})"
                 for n in nodes}
        bad, unknown = [], []
        for node_id, ref in refs.items():
            if ref not in ready:
                unknown.append(names[node_id])
                continue
            try:
                seen = ray.get(ref)
            except Exception:  # the node died meanwhile: it will not run trials either
                unknown.append(names[node_id])
                continue
            if seen != token:
                bad.append(names[node_id])
    finally:
        probe.unlink(missing_ok=True)
    if bad:
        if created is not None:  # a refused search leaves nothing behind
            shutil.rmtree(created, ignore_errors=True)
        raise SpecError(
            f"{root} is not shared storage: this cluster has {len(nodes)} nodes and "
            f"{len(bad)} of them ({', '.join(bad)}) cannot read a file written there by the "
            f"driver. Every trial writes its checkpoints from the node it runs on and Ray no "
            f"longer syncs them to the head node (since Ray 2.7), so results would be "
            f"scattered and lost; allowed: a path mounted at the same place on every node "
            f"(NFS, a shared volume), or an s3://bucket/prefix or gs://bucket/prefix URI",
            field="run.storage_path")
    if unknown:
        echo(f"warning: could not check that {root} is shared on node(s) "
             f"{', '.join(unknown)} within {timeout_s:.0f}s")
    else:
        echo(f"storage: {root} is shared by all {len(nodes)} nodes")


def _trainable_for(spec: Spec, splits: Splits) -> Any:
    res = spec.run.resources
    spec_json = spec.model_dump(mode="json")
    # Trials run in their own folders: a weights file named relative to where rtft was
    # started must reach them as an absolute path.
    spec_json["model"]["weights"] = absolute_weights(spec.model.weights)
    return tune.with_resources(
        tune.with_parameters(_trainable, spec_json=spec_json,
                             data=splits.without_test()),
        {"cpu": res.cpu, "gpu": res.gpu})


def _tuner(spec: Spec, run_dir: Path, splits: Splits, echo: Echo, quiet: bool) -> tune.Tuner:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress lines say enough

    # The Optuna study lives in the run folder as an append-only journal: every ask and tell is
    # on disk at once, whatever happens to the driver.
    journal = run_dir / "optuna.journal"
    fresh = not journal.exists()
    storage = JournalStorage(JournalFileBackend(str(journal)))
    if fresh and spec.searcher.baseline_first:
        # Ray ignores points_to_evaluate with a define-by-run space (ray#35319): enqueue the
        # baseline in the study itself, which OptunaSearch then loads.
        study = optuna.create_study(study_name=spec.name, storage=storage,
                                    direction="maximize" if spec.mode == "max" else "minimize")
        study.enqueue_trial(baseline_params(spec), skip_if_exists=True)
    searcher = ConcurrencyLimiter(
        OptunaSearch(space=define_by_run(spec), sampler=make_sampler(spec),
                     metric=spec.metric, mode=spec.mode, storage=storage,
                     study_name=spec.name),
        max_concurrent=spec.run.max_concurrent_trials)
    sch = spec.scheduler
    # metric/mode go to the searcher and scheduler themselves: Ray does not pass TuneConfig's
    # through a ConcurrencyLimiter.
    scheduler = (_PersistentASHA(run_dir, protect_first=fresh and spec.searcher.baseline_first,
                                 time_attr="training_iteration", max_t=spec.max_t,
                                 metric=spec.metric, mode=spec.mode,
                                 grace_period=sch.grace_period,
                                 reduction_factor=sch.reduction_factor)
                 if sch.type == "asha" else _FIFO())
    budget = _FailureBudget(spec.run.max_failed_trials, echo)
    loc = run_location(spec)
    uploads = [_UploadRunFiles(loc)] if loc.remote else []
    return tune.Tuner(
        _trainable_for(spec, splits),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler,
            num_samples=spec.run.num_samples,
            # One worker process serves trial after trial: no process start and no re-import
            # of torch per trial. _trainable sets every piece of per-trial process state
            # (threads, seeds, cuDNN, logging) itself and frees GPU memory on OOM.
            reuse_actors=True,
            trial_name_creator=lambda t: t.trial_id,
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=loc.remote or str(run_dir),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=spec.run.checkpoints_to_keep,
                checkpoint_score_attribute=spec.metric, checkpoint_score_order=spec.mode),
            failure_config=tune.FailureConfig(max_failures=spec.run.max_failures),
            verbose=0, stop=budget,
            callbacks=[_Progress(spec, echo, quiet), _TensorBoard(spec), budget, *uploads]),
    )


def _records(results: Any, metric: str, mode: str) -> list[TrialRecord]:
    out = []
    for r in results:
        df = r.metrics_dataframe
        history = []
        if df is not None and len(df):
            cols = [c for c in _HISTORY_KEYS if c in df.columns]
            history = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in row.items()} for row in df[cols].to_dict("records")]
        best = None
        if r.best_checkpoints:
            ckpt = r.get_best_checkpoint(metric, mode)
            best = ckpt.path if ckpt else None
            scheme = getattr(getattr(ckpt, "filesystem", None), "type_name", "local")
            if best and scheme not in ("local", "mock"):  # keep the URI: s3://bucket/...
                best = f"{'gs' if scheme == 'gcs' else scheme}://{best.lstrip('/')}"
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name.removeprefix("trial_")
        out.append(TrialRecord(trial_id=trial_id, params=dict(r.config or {}), history=history,
                               best_checkpoint=best,
                               error=str(r.error).strip().splitlines()[-1] if r.error else None))
    return sorted(out, key=lambda t: t.trial_id)


def _records_from_json(run_dir: Path) -> list[TrialRecord] | None:
    """The run's trials.json, when no search has touched the run since it was written: the
    same records run_search built, without re-reading every trial's results (Ray's
    ExperimentAnalysis takes seconds over a few hundred trials). None: read Ray's state."""
    path, states = run_dir / "trials.json", list((run_dir / TUNE_DIR).glob("experiment_state*"))
    if not path.exists() or not states:
        return None
    if path.stat().st_mtime < max(s.stat().st_mtime for s in states):
        return None  # a resumed search ran since, or one is running
    try:
        return [TrialRecord(**r) for r in json.loads(path.read_text())]
    except (ValueError, TypeError):  # hand-edited or from another version: Ray's state decides
        return None


def load_records(run_dir: str | Path, spec: Spec) -> list[TrialRecord]:
    """The trials of a finished (or interrupted) run: its trials.json when that is current,
    else read back through Ray's ResultGrid."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    if not _is_uri(spec.run.storage_path) and (fast := _records_from_json(Path(run_dir))):
        return fast
    path = (run_location(spec).tune_path if _is_uri(spec.run.storage_path)
            else str(Path(run_dir).resolve() / TUNE_DIR))
    analysis = ExperimentAnalysis(path,
                                  default_metric=spec.metric,
                                  default_mode=spec.mode)
    return _records(ResultGrid(analysis), spec.metric, spec.mode)


def summary_rows(records: list[TrialRecord], spec: Spec) -> list[dict[str, Any]]:
    """One flat dict per trial, best first: id, state, epochs, best metric, every parameter."""
    m = spec.metric
    return [{"trial": r.trial_id, "state": trial_state(r, spec.max_t), "epochs": r.epochs,
             f"best_{m}": r.best(m), **{n: r.params.get(n) for n in spec.search},
             "error": r.error} for r in ranked(records, m)]


def summary_table(records: list[TrialRecord], spec: Spec, limit: int = 10) -> str:
    """The trials sorted by best-so-far metric, as a fixed-width text table."""
    return "\n".join(text_table(*trial_table(records, spec, limit)))


def rung_summary(records: list[TrialRecord], spec: Spec) -> str:
    """How many trials ended at each epoch, and why."""
    counts: dict[str, int] = {}
    for r in records:
        s = trial_state(r, spec.max_t)
        counts[s] = counts.get(s, 0) + 1
    order = sorted(counts, key=lambda s: (s != "completed", s))
    return ", ".join(f"{counts[s]} {s}" for s in order)


def preflight(spec: Spec, num_classes: int) -> None:
    """Build the model with the spec's weights once in the driver: a missing weights file or
    one that does not fit the architecture is refused before any trial starts."""
    weights = resolve_weights(spec.model.weights, spec.model.arch, spec.data.image_size)
    built = build_model(spec.model, num_classes, Hyperparams(), weights)
    depth = spec.search.get("freeze_depth")
    top = max(depth.candidates().values(), default=0) if depth is not None else 0
    if isinstance(top, int) and top > len(built.stages):
        raise SpecError(f"{spec.model.arch} has {len(built.stages)} stages "
                        f"({', '.join(s.name for s in built.stages)}); allowed: 0.."
                        f"{len(built.stages)}", field="search.freeze_depth")


# Room for a few checkpoints and run files; a search that fills the disk mid-way loses trials.
_MIN_FREE_BYTES = 200 * 2**20


def _check_writable(path: str, field: str) -> None:
    """Refuse, before launch, a local folder that cannot be created or written (a file in the
    way, no permission, a read-only mount) or whose disk is nearly full. URIs (s3://, gs://)
    are left to the storage layer. Nothing is left behind: the probe file is removed."""
    if "://" in path:
        return
    target = Path(path).expanduser().absolute()
    base = target
    while not base.exists() and base != base.parent:  # the folder that holds what we create
        base = base.parent
    if not base.is_dir():
        raise SpecError(f"{str(target)!r} cannot be a folder: {str(base)!r} is a file; "
                        f"allowed: a folder path (created if missing)", field=field)
    try:  # as root, permission bits say nothing: try it
        fd, probe = tempfile.mkstemp(prefix=".rtft-write-check-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SpecError(f"{str(target)!r} is not writable ({e.strerror} in {base}); allowed: "
                        f"a folder you can write to", field=field) from None
    free = shutil.disk_usage(base).free
    if free < _MIN_FREE_BYTES:
        raise SpecError(f"{str(target)!r}: the disk is full ({free / 2**20:.0f} MB free in "
                        f"{base}); allowed: a folder on a disk with at least "
                        f"{_MIN_FREE_BYTES // 2**20} MB free", field=field)


def _local_resources() -> dict[str, float]:
    """What a local Ray started here would offer, keyed like ray.cluster_resources()."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def _first_missing(path: Path) -> Path | None:
    """The topmost missing folder on the way to `path` (None when `path` exists)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def _check_cluster_fit(spec: Spec, created: Path | None) -> None:
    """check_fit against the Ray this process is joined to; on refusal, remove the folders
    the run lock created, so that a refused search leaves nothing behind."""
    try:
        check_fit(spec, ray.cluster_resources(), where="the Ray cluster")
    except SpecError:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One search per run folder at a time: a second one is refused, never interleaved."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".rtft.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise SpecError(f"the run {run_dir} is in use by another rtft search ({holder}); "
                            f"wait for it, or choose another name with --set name=...",
                            field="name") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_search(spec: Spec, *, address: str | None = None, echo: Echo = print,
               quiet: bool = False, resume: bool = False) -> SearchOutcome:
    """Run the whole search for `spec` and promote the best trial(s).

    `resume`: continue the interrupted run of the same name (finished trials are kept, running
    ones restart from their last checkpoint, the searcher and ASHA's rungs are restored).
    """
    t0 = time.monotonic()
    loc = run_location(spec)  # with an s3:// or gs:// storage_path: a local staging folder
    run_dir = loc.local
    if _is_uri(spec.promote.dir):
        raise SpecError(f"{spec.promote.dir!r}: promoted models are written to a local or "
                        f"mounted folder; allowed: a path (on a cluster job, one on shared "
                        f"storage)", field="promote.dir")
    # Everything that can be wrong with the input fails here, before Ray or any file.
    _check_writable(spec.run.storage_path, "run.storage_path")
    _check_writable(spec.promote.dir, "promote.dir")
    local = not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    if local:  # the Ray we would start gets this machine's CPUs and GPUs
        check_fit(spec, _local_resources(), where="this machine")
    ensure_backbone(spec, echo=echo)
    splits = prepare(spec.data)
    preflight(spec, splits.num_classes)
    echo(f"data: {spec.data.source} — {len(splits.train_y)} train / {len(splits.val_y)} val / "
         f"{len(splits.test_y)} test (held out) images, {splits.num_classes} classes")
    exists = _tune_exists(loc)
    if exists and resume:
        _download_run_files(loc)  # a resume on another machine: rtft's files from the URI
    if exists and not resume:
        raise SpecError(f"a run named {spec.name!r} already exists in {run_dir.parent}; pass "
                        f"--resume to continue it, or --set name=... for a new run", field="name")
    if resume and not exists:
        echo(f"nothing to resume in {run_dir}: starting a new run")
    if exists and resume and (run_dir / "spec.yaml").exists():
        def comparable(s: Spec) -> dict:  # the same search, wherever the folder now lives
            d = s.model_dump(mode="json")
            d["run"].pop("storage_path")
            return d

        if comparable(load_spec(run_dir / "spec.yaml")) != comparable(spec):
            raise SpecError(f"--resume with a spec that differs from the run's own "
                            f"{run_dir / 'spec.yaml'}; resume with that file", field="name")
    created = _first_missing(run_dir)  # what the lock creates: removed if the fit check fails
    with _run_lock(run_dir):
        started = _ensure_ray(address, echo)
        try:
            if not local:  # a cluster, or a Ray this process already runs: ask it
                _check_cluster_fit(spec, created)
            if loc.remote is None:
                check_shared_storage(run_dir.parent, echo, created)
            (run_dir / "spec.yaml").write_text(spec_to_yaml(spec))
            (run_dir / "data.json").write_text(json.dumps(splits.fingerprint, indent=1))
            echo(f"results: {loc.root}" + (f"  (rtft's files staged in {run_dir})"
                                           if loc.remote else ""))
            echo(f"watch:   tensorboard --logdir {loc.root} --host 127.0.0.1")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning (TPE options)
                if exists and resume:
                    echo("resuming: finished trials are kept, running ones restart from their "
                         "last checkpoint")
                    tuner = tune.Tuner.restore(loc.tune_path,
                                               trainable=_trainable_for(spec, splits),
                                               resume_unfinished=True, resume_errored=True)
                else:
                    tuner = _tuner(spec, run_dir, splits, echo, quiet)
                results = tuner.fit()
            records = _records(results, spec.metric, spec.mode)
        finally:
            if started:
                ray.shutdown()
    (run_dir / "trials.json").write_text(json.dumps([r.__dict__ for r in records], indent=1,
                                                    default=str))
    _upload_run_files(loc)
    localize_checkpoints(records, spec)
    echo("")
    echo(f"{len(records)} trials: {rung_summary(records, spec)}")
    echo(summary_table(records, spec))
    promoted = promote(spec, records, splits, echo=echo)
    return SearchOutcome(run_dir, records, promoted, time.monotonic() - t0)

