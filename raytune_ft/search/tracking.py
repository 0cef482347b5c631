"""A search recorded in MLflow (`track.mlflow`, optional: ``pip install -e '.[mlflow]'``).

One parent run per search (a few spec values as parameters; `spec.yaml`, `data.json`,
`trials.json` and the results table as artifacts), one child run per trial (its parameters,
each epoch's metrics with the epoch as step, its cost, its final state as the tag
`rtft.state`), and each promoted model folder as a new version of a registered model.

Everything is logged from the driver by one background thread: the Tune callback
(:class:`TrackingEvents`) only puts events on a queue, so no trial and no step of Tune's loop
ever waits on the tracking server. At the end, :meth:`Tracker.finish` logs from the search's
own records whatever the events missed (a driver killed mid-search, a resume) before the
artifacts and the registry. The parent run's id is kept in the run folder (`mlflow.json`);
a resumed search continues the same parent run and finds its child runs by their tags, and
logs only epochs after the last one each child holds: nothing twice.

A tracking server that cannot be reached or refuses a request ends the tracking, with one
warning line, never the search: the run folder keeps every record, and the resume of an
interrupted search logs what MLflow is missing. mlflow is imported only in the background
thread (and by :func:`register_promoted`).

Ray's own `MLflowLoggerCallback` was not used: it makes no parent run, calls the server
synchronously from Tune's loop at every result, logs Ray's bookkeeping columns, and makes new
runs for every trial on a resume (its runs are kept in memory only).
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import tune

from raytune_ft.errors import first_line
from raytune_ft.runs import HISTORY_KEYS, Echo, TrialRecord, trial_state
from raytune_ft.spec.schema import Spec
from raytune_ft.spec.track import local_store_path
from raytune_ft.tables import summary_table

__all__ = ["STATE_FILE", "Tracker", "TrackingEvents", "register_promoted", "start_tracking"]

STATE_FILE = "mlflow.json"
# MLflow's settings unless the environment says otherwise: an unreachable server is given up
# in seconds, not after MLflow's default 7 retries with exponential backoff; ending a run does
# not print two "View run" lines per trial into the search's output.
_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# The run folder's files the parent run keeps as artifacts (when present).
_RUN_ARTIFACTS = ("spec.yaml", "data.json", "trials.json", "environment.json")
_METRIC_KEYS = tuple(k for k in HISTORY_KEYS if k not in ("diverged", "timestamp"))
_BATCH = 900  # MLflow takes at most 1,000 metrics per log_batch
_LIVE: dict[str, Tracker] = {}  # run name → the tracker of the search running it here


class Tracker:
    """The MLflow side of one search (or one promotion): a queue and the thread that empties
    it. Construct it with :func:`start_tracking`; call the `trial_*` methods from Tune's loop
    (they only queue), and :meth:`finish` once at the end."""

    def __init__(self, spec: Spec, run_dir: Path, echo: Echo) -> None:
        assert spec.track.mlflow is not None
        self.spec, self.run_dir, self.echo = spec, Path(run_dir), echo
        self.cfg = spec.track.mlflow
        self.experiment = self.cfg.experiment or spec.name
        self.model_name = self.cfg.registered_model or spec.name
        self.off = False  # set by the first failure: the tracking stops, the search goes on
        self.parent: str | None = None
        self.children: dict[str, str] = {}  # trial id → child run id
        self.logged: dict[str, int] = {}  # trial id → last epoch logged
        self.versions: list[dict[str, str]] = []
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="rtft-mlflow", daemon=True)
        self._q.put(("open",))
        self._thread.start()

    # -- from Tune's loop: queue only ---------------------------------------------------------
    def trial_start(self, trial_id: str, params: dict[str, Any]) -> None:
        """A trial started (or restarted)."""
        if not self.off:
            self._q.put(("child", trial_id, dict(params)))

    def trial_result(self, trial_id: str, params: dict[str, Any], result: dict) -> None:
        """One epoch's result of a trial."""
        if not self.off:
            row = {k: result[k] for k in (*_METRIC_KEYS, "timestamp") if k in result}
            self._q.put(("epochs", trial_id, dict(params), [row]))

    def trial_end(self, trial_id: str, failed: bool) -> None:
        """A trial ended (its final state is set by :meth:`finish`, from its record)."""
        if not self.off:
            self._q.put(("end", trial_id, "FAILED" if failed else "FINISHED"))

    # -- at the end -----------------------------------------------------------------------------
    def finish(self, records: Sequence[TrialRecord] | None, promoted: Sequence[Path] = (),
               *, timeout: float = 600.0) -> None:
        """Log what the events missed from `records` (None: no trial to log, as for `rtft
        promote`), the run's files, and each `promoted` model folder as a registry version;
        end the parent run; wait for it all (at most `timeout` seconds)."""
        _LIVE.pop(self.spec.name, None)
        self._q.put(("finish", list(records) if records is not None else None,
                     [Path(p) for p in promoted]))
        self._q.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.echo(f"warning: MLflow at {self.cfg.uri} took over {timeout:.0f} s; not "
                      f"waiting for it longer (the run folder keeps every record)")

    def abort(self, *, timeout: float = 30.0) -> None:
        """The search failed or was interrupted: end the runs as KILLED (a resume reopens
        them) and stop the thread; wait at most `timeout` seconds."""
        _LIVE.pop(self.spec.name, None)
        self._q.put(("abort",))
        self._q.put(None)
        self._thread.join(timeout)

    # -- the background thread ------------------------------------------------------------------
    def _work(self) -> None:
        while (item := self._q.get()) is not None:
            if self.off:
                continue
            try:
                getattr(self, "_" + item[0])(*item[1:])
            except Exception as e:  # never into the search: one line, then no more tracking
                self.off = True
                self.echo(f"warning: MLflow tracking stopped: {self.cfg.uri}: "
                          f"{_short(e)}; the search goes on and keeps every record in "
                          f"{self.run_dir}")

    def _open(self) -> None:
        store = _local_store(self.cfg.uri)
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
        self.client = _client(self.cfg.uri)
        saved = _read_state(self.run_dir)
        if saved.get("uri") == self.cfg.uri:
            self.versions = list(saved.get("registered", []))
        if saved.get("uri") == self.cfg.uri and saved.get("experiment") == self.experiment \
                and self._reopen(saved.get("parent")):
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:  # MLflow 3's UI then opens it on its training runs, not GenAI's view
            self.exp_id = self.client.create_experiment(
                self.experiment, tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            self.exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(self.exp_id)
        run = self.client.create_run(self.exp_id, run_name=self.spec.name,
                                     tags={"rtft.run_dir": str(self.run_dir.resolve()),
                                           "rtft.kind": "search"})
        self.parent = run.info.run_id
        self._log(self.parent, params=_search_params(self.spec))
        self._save()

    def _reopen(self, parent: str | None) -> bool:
        """Continue the saved parent run and find its child runs (their last epoch too);
        False when the server no longer has it."""
        from mlflow.exceptions import MlflowException

        if not parent:
            return False
        try:
            run = self.client.get_run(parent)
        except MlflowException as e:  # gone: a new parent; any other failure is a failure
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return False
        if run.info.lifecycle_stage != "active":
            return False
        self.parent, self.exp_id = parent, run.info.experiment_id
        self.client.update_run(parent, status="RUNNING")
        token = None
        while True:
            page = self.client.search_runs(
                [self.exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                max_results=1000, page_token=token)
            for child in page:
                tid = child.data.tags.get("rtft.trial_id")
                if tid:
                    self.children[tid] = child.info.run_id
                    self.logged[tid] = int(child.data.metrics.get("epoch", 0))
            token = page.token
            if not token:
                return True

    def _child(self, trial_id: str, params: dict[str, Any]) -> str:
        if trial_id not in self.children:
            run = self.client.create_run(
                self.exp_id, run_name=trial_id,
                tags={"mlflow.parentRunId": self.parent, "rtft.trial_id": trial_id})
            self.children[trial_id], self.logged[trial_id] = run.info.run_id, 0
            self._log(run.info.run_id, params=params)
            self._save()
        return self.children[trial_id]

    def _epochs(self, trial_id: str, params: dict[str, Any], rows: list[dict]) -> None:
        from mlflow.entities import Metric

        run_id = self._child(trial_id, params)
        last = self.logged.get(trial_id, 0)
        new = sorted((r for r in rows if int(r.get("epoch", 0)) > last),
                     key=lambda r: int(r["epoch"]))
        metrics = []
        for r in new:
            step = int(r["epoch"])
            ts = int(float(r.get("timestamp") or time.time()) * 1000)
            metrics += [Metric(k, float(r[k]), ts, step) for k in _METRIC_KEYS
                        if _number(r.get(k))]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + _BATCH])
        if new:
            self.logged[trial_id] = int(new[-1]["epoch"])

    def _end(self, trial_id: str, status: str) -> None:
        if trial_id in self.children:
            self.client.set_terminated(self.children[trial_id], status)

    def _abort(self) -> None:
        if self.parent is None:
            return
        for run_id in self.children.values():
            self.client.set_terminated(run_id, "KILLED")
        self._save()
        self.client.set_terminated(self.parent, "KILLED")

    def _finish(self, records: list[TrialRecord] | None, promoted: list[Path]) -> None:
        if records is not None:
            for rec in records:
                self._epochs(rec.trial_id, rec.params, rec.history)
                state = trial_state(rec, self.spec.max_t)
                run_id = self.children[rec.trial_id]
                self._log(run_id, tags={"rtft.state": state},
                          metrics={f"cost_{k}": v for k, v in rec.cost.items()})
                status = ("FAILED" if state in ("failed", "oom", "diverged") else
                          "KILLED" if state == "pending" else "FINISHED")
                self.client.set_terminated(run_id, status)
            self._parent_summary(records)
        for folder in promoted:
            self.versions.append(_register(self.client, self.parent, folder, self.model_name,
                                           self.cfg.registry))
        self._save()
        self.client.set_terminated(self.parent, "FINISHED")

    def _parent_summary(self, records: list[TrialRecord]) -> None:
        import tempfile

        for name in _RUN_ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.parent, str(self.run_dir / name))
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "results.txt"
            table.write_text(summary_table(records, self.spec, limit=len(records)) + "\n")
            self.client.log_artifact(self.parent, str(table))
        metric = self.spec.metric
        best = [b for r in records if (b := r.best(metric)) is not None]
        states = [trial_state(r, self.spec.max_t) for r in records]
        summary: dict[str, float] = {"trials": float(len(records)),
                                     "completed": float(states.count("completed"))}
        if best:
            summary[f"best_{metric}"] = max(best) if self.spec.mode == "max" else min(best)
        self._log(self.parent, metrics=summary)

    def _log(self, run_id: str, *, params: dict | None = None, tags: dict | None = None,
             metrics: dict | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()
                     if _number(v)])

    def _save(self) -> None:
        state = {"uri": self.cfg.uri, "experiment": self.experiment,
                 "experiment_id": self.exp_id, "parent": self.parent,
                 "children": dict(sorted(self.children.items())),
                 "registered": self.versions}
        tmp = self.run_dir / f".{STATE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.run_dir / STATE_FILE)


def start_tracking(spec: Spec, run_dir: Path, echo: Echo) -> Tracker | None:
    """The tracker of a search or promotion of `spec` (None when `track.mlflow` is not set);
    the search's :class:`TrackingEvents` reach it by the run's name."""
    if spec.track.mlflow is None:
        return None
    tracker = Tracker(spec, run_dir, echo)
    _LIVE[spec.name] = tracker
    return tracker


class TrackingEvents(tune.Callback):
    """Tune's events, handed to the running search's :class:`Tracker`. Holds only the run's
    name: Ray pickles callbacks with the run (tuner.pkl), and the restored one of a resumed
    search reaches that search's tracker (or nothing, when tracking is off)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _tracker(self) -> Tracker | None:
        return _LIVE.get(self.name)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (t := self._tracker()) is not None:
            t.trial_start(trial.trial_id, trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if (t := self._tracker()) is not None:
            t.trial_result(trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (t := self._tracker()) is not None:
            t.trial_end(trial.trial_id, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (t := self._tracker()) is not None:
            t.trial_end(trial.trial_id, failed=True)


# --------------------------------------------------------------------------------------------
# The Model Registry
# --------------------------------------------------------------------------------------------
def register_promoted(model_dir: str | Path, *, uri: str, name: str,
                      run_id: str | None = None, experiment: str | None = None) -> dict[str, str]:
    """Register the promoted model folder `model_dir` (every file: weights, config, model card,
    metrics, `model.onnx` when exported) as a new version of registered model `name` at
    tracking URI `uri`; its artifacts are logged to run `run_id`, else to a new run of
    `experiment` (default: `name`). Returns the version's name, version and source."""
    client = _client(uri)
    if run_id is None:
        exp = client.get_experiment_by_name(experiment or name)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment or name)
        run_id = client.create_run(exp_id, run_name=f"register {Path(model_dir).name}",
                                   tags={"rtft.kind": "registration"}).info.run_id
        client.set_terminated(run_id, "FINISHED")
    return _register(client, run_id, Path(model_dir), name, True)


def _register(client: Any, run_id: str, folder: Path, name: str, register: bool
              ) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    path = f"promoted/{folder.parent.name}/{folder.name}"
    client.log_artifacts(run_id, str(folder), artifact_path=path)
    source = f"{client.get_run(run_id).info.artifact_uri}/{path}"
    out = {"folder": str(folder), "source": source}
    if not register:
        return out
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    try:
        client.create_registered_model(name, description="Models promoted by rtft searches.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    size = config.get("spec", {}).get("data", {}).get("image_size")
    tags = {"rtft.folder": str(folder), "trial_id": metrics.get("trial_id"),
            "arch": metrics.get("arch"), "test_acc": metrics.get("test", {}).get("acc"),
            "test_loss": metrics.get("test", {}).get("loss"),
            "input_size": json.dumps([3, size, size]), "classes": json.dumps(config["classes"]),
            "mean": json.dumps(config.get("mean")), "std": json.dumps(config.get("std")),
            "weights_sha256": metrics.get("sha256"),
            "onnx": str((folder / "model.onnx").is_file()).lower()}
    card = folder / "MODEL_CARD.md"
    mv = client.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items() if v is not None},
        description=card.read_text()[:5000] if card.is_file() else None,
        await_creation_for=0)  # ready at once: the files are logged already
    return {**out, "name": name, "version": str(mv.version)}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _client(uri: str) -> Any:
    """An MlflowClient of `uri` (tracking and registry), with rtft's defaults of MLflow's
    settings (`_ENV_DEFAULTS`) where the environment gives none."""
    from mlflow.tracking import MlflowClient

    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _search_params(spec: Spec) -> dict[str, Any]:
    """What the parent run shows of the spec as parameters (the whole spec is an artifact)."""
    return {"name": spec.name, "metric": spec.metric, "mode": spec.mode,
            "arch": ",".join(spec.archs), "weights": json.dumps(spec.model.weights)
            if isinstance(spec.model.weights, dict) else spec.model.weights,
            "data.source": spec.data.source, "data.image_size": spec.data.image_size,
            "train.max_epochs": spec.train.max_epochs, "run.num_samples": spec.run.num_samples,
            "searcher.sampler": spec.searcher.sampler, "scheduler.type": spec.scheduler.type,
            "searched": ",".join(n for n, p in spec.params.items() if p.space != "fixed")}


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _local_store(uri: str) -> Path | None:
    """The folder a local store writes into (created before MLflow opens it)."""
    path = local_store_path(uri)
    if path is None:
        return None
    return Path(path) if uri.startswith("file:") else Path(path).parent


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(e: BaseException) -> str:
    """One line of an MLflow error (its messages can quote a whole HTTP response)."""
    text = first_line(e)
    if "Max retries exceeded" in str(e):  # urllib3's account of a connection that failed
        why = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(Read timed out|timed out)", str(e))
        return f"no answer ({(why.group(1) or why.group(2)) if why else 'connection failed'})"
    return text if len(text) <= 200 else text[:197] + "..."

