"""Tune callbacks: progress lines, the failure budget, TensorBoard, uploads of run files."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from ray import tune
from ray.tune.logger import TBXLoggerCallback

from raytune_ft.runs import COST_KEYS, Echo, RunLocation
from raytune_ft.search.ray_private import tbx_file_writer
from raytune_ft.search.storage import upload_run_files
from raytune_ft.spec.schema import Spec
from raytune_ft.tables import fmt, text_table


class Progress(tune.Callback):
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
        m, names = self.spec.metric, [n for n, p in self.spec.params.items()
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
        # The trials started and not ended, not a count over `trials`: that list holds every
        # trial of the search, and a pass over it per result grows with the search.
        self._line(f"{trial.trial_id} epoch {result.get('epoch')}/{self.spec.max_t}  "
                   f"{m} {value:.4f}  best {best:.4f}  "
                   f"{result.get('images_per_s', 0):.0f} img/s  ({len(self.rows)} running, "
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


class FailureBudget(tune.Callback, tune.Stopper):
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


class TensorBoard(TBXLoggerCallback):
    """Ray's TensorBoard logger, with HParams that list every searched parameter for every
    trial: a parameter inactive in a trial (`momentum` with adamw, a knob whose `when` excludes
    the trial's `arch`) is logged as "n/a" instead of silently missing (ray#40053).

    Scalars: Ray writes each numeric metric of every epoch as `ray/tune/<key>` (the cost
    values too: `ray/tune/latency_b1_ms`, …; a NaN is skipped). HParams: the trial's last
    epoch's score and cost (`COST_KEYS`) beside its parameters, so the HParams table and
    parallel-coordinates view can set accuracy against latency, parameters, FLOPs."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self._spec = spec

    def _try_log_hparams(self, trial: Any, result: dict) -> None:
        from tensorboardX.summary import hparams

        params: dict[str, Any] = {}
        for name in self._spec.params:  # `arch` first when it is searched
            params[name] = trial.config.get(name, "n/a")
        keep = ("val_acc", "val_loss", "train_loss", f"best_{self._spec.metric}", *COST_KEYS)
        metrics = {k: v for k, v in result.items() if k.split("/")[-1] in keep}
        try:
            for summary in hparams(hparam_dict=params, metric_dict=metrics):
                tbx_file_writer(self, trial).add_summary(summary)
        except Exception:  # never let logging kill a search
            logging.getLogger(__name__).exception("could not write TensorBoard hparams")


class UploadRunFiles(tune.Callback):
    """After a trial ends, upload rtft's run files to the run's URI (Ray uploads its own
    experiment state itself), and once more when the search ends.

    The files grow with the trials (the Optuna journal, ASHA's log), so an upload at every
    trial end would send bytes quadratic in the trials. As for Ray's snapshots
    (`ray_private.snapshot_at_step_end`), uploads may take at most 5 % of the time: a trial
    end uploads only once 19 times the last upload's duration has passed."""

    def __init__(self, loc: RunLocation) -> None:
        self.loc = loc
        self._last, self._took = float("-inf"), 0.0

    def _upload(self, *, always: bool = False) -> None:
        now = time.monotonic()
        if not always and now - self._last < 19 * self._took:
            return
        try:
            upload_run_files(self.loc)
        except Exception:  # a failed upload is retried next time; never end the search on it
            logging.getLogger(__name__).exception("could not upload run files to %s",
                                                  self.loc.remote)
        self._last, self._took = time.monotonic(), time.monotonic() - now

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._upload()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._upload()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._upload(always=True)
