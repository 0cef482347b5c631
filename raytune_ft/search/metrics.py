"""The search's metrics in Ray's own metrics system, published by a Tune callback in the driver.

Through `ray.util.metrics`, every series lands in the Prometheus endpoint of the driver's Ray
node (`ray.nodes()[…]["MetricsExportPort"]`, printed at the start of a search) with Ray's `ray_`
prefix, and in Grafana through `cluster/grafana_rtft.json`. Ray adds its own labels
(`SessionName`, `NodeAddress`, …); ours are the run's name and, where it says so, the trial.

| series (Prometheus)                   | kind      | labels             | what                   |
|---------------------------------------|-----------|--------------------|------------------------|
| `ray_rtft_trials`                     | gauge     | run, state         | trials by state        |
| `ray_rtft_trials_planned`             | gauge     | run                | `run.num_samples`      |
| `ray_rtft_best_metric`                | gauge     | run, metric        | best value so far      |
| `ray_rtft_epochs_finished_total`      | counter   | run                | epochs, all trials     |
| `ray_rtft_trials_stopped_total`       | counter   | run, rung          | ASHA stops, by epoch   |
| `ray_rtft_epoch_seconds_bucket`, …    | histogram | run                | seconds per epoch      |
| `ray_rtft_trial_epoch_seconds`        | gauge     | run, trial         | its last epoch, s      |
| `ray_rtft_trial_metric`               | gauge     | run, trial, metric | its last metric value  |

Each Tune event costs O(1): counts move between states with a per-trial state record, never a
pass over all trials (the driver stays flat at 10,000 trials). Ray drops a gauge from the
endpoint when it was not recorded within two of its exports (every 10 s), so the gauges are
recorded again every REFRESH_S from Tune's controller steps: the run's few, and the per-trial
ones of running trials only. A trial's series leave the endpoint about 20 s after it ends
(Prometheus keeps what it scraped): the endpoint carries as many per-trial series as trials
run at once, whatever the search's size.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ray import tune

from raytune_ft.spec.schema import Spec

# Trial states, as rtft's own tables name them (runs.trial_state): a trial is running from its
# start until it ends; a trial that failed and will be retried is retrying until it restarts.
STATES = ("running", "retrying", "completed", "stopped", "diverged", "failed")

# How often gauges are recorded again: well inside Ray's export interval
# (metrics_report_interval_ms, 10 s), after two of which an unrecorded gauge is dropped.
REFRESH_S = 4.0

# Seconds per epoch, from a tiny CPU trial to a long GPU epoch.
EPOCH_BUCKETS = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]

# name → (kind, description, tag keys), as published through ray.util.metrics; Prometheus
# shows them with a `ray_` prefix (and `_total` on counters).
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rtft_trials": ("gauge", "Trials of an rtft search by state", ("run", "state")),
    "rtft_trials_planned": ("gauge", "Trials the rtft search runs in all (run.num_samples)",
                            ("run",)),
    "rtft_best_metric": ("gauge", "Best value of the search metric over all trials so far",
                         ("run", "metric")),
    "rtft_epochs_finished": ("counter", "Epochs finished by all trials", ("run",)),
    "rtft_trials_stopped": ("counter", "Trials ASHA stopped early, by the epoch (rung) they "
                            "reached", ("run", "rung")),
    "rtft_epoch_seconds": ("histogram", "Seconds per epoch, all trials", ("run",)),
    "rtft_trial_epoch_seconds": ("gauge", "Seconds the trial's last epoch took",
                                 ("run", "trial")),
    "rtft_trial_metric": ("gauge", "The trial's last value of the search metric",
                          ("run", "trial", "metric")),
}


def prometheus_names() -> set[str]:
    """The series names a Prometheus scrape shows for METRICS (histograms as their parts)."""
    out = set()
    for name, (kind, _, _) in METRICS.items():
        full = f"ray_{name}"
        if kind == "counter":
            out.add(f"{full}_total")
        elif kind == "histogram":
            out |= {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
        else:
            out.add(full)
    return out


def ray_metrics() -> dict[str, Any]:
    """METRICS as `ray.util.metrics` objects (in the process that records them)."""
    from ray.util.metrics import Counter as RayCounter
    from ray.util.metrics import Gauge, Histogram

    out: dict[str, Any] = {}
    for name, (kind, description, tags) in METRICS.items():
        if kind == "histogram":
            out[name] = Histogram(name, description, boundaries=EPOCH_BUCKETS, tag_keys=tags)
        else:
            out[name] = (RayCounter if kind == "counter" else Gauge)(name, description,
                                                                      tag_keys=tags)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class _Ending:
    state: str
    epoch: int


class SearchMetrics(tune.Callback):
    """Publishes the search's metrics (module doc) from Tune's events in the driver.

    The `ray.util.metrics` objects are made on first use in the process that runs the search
    (`make`: a factory, for tests) and never pickled: Tune keeps its callbacks in the run's
    `tuner.pkl`, and a resumed search makes its own. A resumed search first counts the trials
    that had already ended (once, at its first step), so the counts are the run's."""

    def __init__(self, spec: Spec, make: Callable[[], dict[str, Any]] = ray_metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.metric, self.mode = spec.name, spec.metric, spec.mode
        self.max_t, self.planned = spec.max_t, spec.run.num_samples
        self.make, self.clock = make, clock
        self._m: dict[str, Any] | None = None
        self._state: dict[str, str] = {}  # trial id → its state in STATES
        self._count: Counter[str] = Counter()
        self._best: float | None = None
        self._live: dict[str, dict[str, float]] = {}  # running trial → its per-trial gauges
        self._refreshed = float("-inf")
        self._seeded = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_m"] = None
        return state

    # -- recording ---------------------------------------------------------------------
    def _metrics(self) -> dict[str, Any]:
        if self._m is None:
            self._m = self.make()
            self._refresh(force=True)
        return self._m

    def _refresh(self, force: bool = False) -> None:
        """Record every gauge again (module doc), at most every REFRESH_S: O(states + running
        trials), from the controller's steps."""
        now = self.clock()
        if not force and now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        m, run = self._metrics(), self.run
        m["rtft_trials_planned"].set(self.planned, tags={"run": run})
        for s in STATES:  # every state's series, 0 included
            m["rtft_trials"].set(self._count[s], tags={"run": run, "state": s})
        if self._best is not None:
            m["rtft_best_metric"].set(self._best, tags={"run": run, "metric": self.metric})
        for tid, last in self._live.items():
            self._set_trial(tid, **last)

    def _set_trial(self, tid: str, seconds: float | None = None,
                   value: float | None = None) -> None:
        m = self._metrics()
        if seconds is not None:
            m["rtft_trial_epoch_seconds"].set(seconds, tags={"run": self.run, "trial": tid})
        if value is not None:
            m["rtft_trial_metric"].set(value, tags={"run": self.run, "trial": tid,
                                                    "metric": self.metric})

    def _move(self, trial_id: str, state: str) -> None:
        """Trial `trial_id` is now in `state`: two counts change, two series are set."""
        old = self._state.get(trial_id)
        if old == state:
            return
        self._state[trial_id] = state
        if state != "running":
            self._live.pop(trial_id, None)  # its series leave the endpoint (module doc)
        m = self._metrics()["rtft_trials"]
        for s, delta in ((old, -1), (state, 1)):
            if s is not None:
                self._count[s] += delta
                m.set(self._count[s], tags={"run": self.run, "state": s})

    def _better(self, value: Any) -> None:
        if not _finite(value):
            return
        if self._best is None or (value > self._best if self.mode == "max"
                                  else value < self._best):
            self._best = float(value)
            self._metrics()["rtft_best_metric"].set(self._best, tags={"run": self.run,
                                                                      "metric": self.metric})

    def _ending(self, trial: Any) -> _Ending:
        """How a trial that Tune calls complete ended, as Progress and `rtft results` say."""
        r = trial.last_result or {}
        epoch = int(r.get("epoch") or r.get("training_iteration") or 0)
        if r.get("diverged"):
            return _Ending("diverged", epoch)
        return _Ending("stopped" if epoch < self.max_t else "completed", epoch)

    def _ended(self, trial: Any, ending: _Ending) -> None:
        self._move(trial.trial_id, ending.state)
        if ending.state == "stopped":
            self._metrics()["rtft_trials_stopped"].inc(
                1, tags={"run": self.run, "rung": str(ending.epoch)})

    def _seed(self, trials: Iterable[Any]) -> None:
        """Once, at the first step: trials a resumed search found already ended."""
        self._seeded = True
        self._metrics()
        epochs = 0
        for t in trials:
            if t.status not in ("TERMINATED", "ERROR") or t.trial_id in self._state:
                continue
            r = t.last_result or {}
            epochs += int(r.get("training_iteration") or 0)
            if not r.get("diverged"):
                self._better(r.get(f"best_{self.metric}", r.get(self.metric)))
            self._ended(t, _Ending("failed", 0) if t.status == "ERROR" else self._ending(t))
        if epochs:
            self._m["rtft_epochs_finished"].inc(epochs, tags={"run": self.run})

    # -- Tune's events -------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self._metrics()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._seeded:
            self._seed(trials)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._refresh()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._move(trial.trial_id, "running")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        m, run, tid = self._metrics(), self.run, trial.trial_id
        self._move(tid, "running")  # a restored trial may report before Tune says it started
        m["rtft_epochs_finished"].inc(1, tags={"run": run})
        live = self._live.setdefault(tid, {})
        seconds = result.get("time_this_iter_s")
        if _finite(seconds) and seconds >= 0:
            m["rtft_epoch_seconds"].observe(seconds, tags={"run": run})
            live["seconds"] = float(seconds)
        value = result.get(self.metric)
        # A diverged trial's reported value is the worst one by design: not a measurement.
        if _finite(value) and not result.get("diverged"):
            live["value"] = float(value)
            self._better(result.get(f"best_{self.metric}", value))
        self._set_trial(tid, **live)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._move(trial.trial_id, "retrying")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, self._ending(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._move(trial.trial_id, "failed")
