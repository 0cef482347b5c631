"""`rtft reproduce RUN_DIR TRIAL_ID`: one trial of a finished search trained again by the plain
trainer, outside Ray, and compared epoch by epoch with what the trial reported.

The trial is rebuilt the way the search ran it (search/trainable.py): the run's `spec.yaml`,
the trial's parameters (:func:`raytune_ft.space.hparams_for`), weights made absolute (an
`rtft:` recipe resolves to its cached backbone), one CPU thread per `run.resources.cpu`, the
data without its test split, the device it ran on, and for a distilled trial its teacher's
logits, from `teacher` (`rtft reproduce`: :func:`raytune_ft.distill.reproduction_teacher`).
Data whose fingerprint is not the run's `data.json`'s is refused first (:class:`UserError`).

Tolerance: CPU float results are bit-equal only in the same environment (torch build, CPU
model and ISA, thread count, ...: :mod:`raytune_ft.environment`), so the trial's recorded
environment (its checkpoint's config.json, else the run's environment.json) is compared with
this one first. The same, on a CPU: `train_loss`, `val_loss`, `val_acc` of every epoch the
trial ran must be equal to the last bit. Another environment, or none recorded: within
:data:`ENV_RTOL` (1e-4) relative, the differences named. On GPU, cuDNN's autotuner picks
kernels by timing and some backward kernels accumulate with atomics, so runs differ in the
last digits even in the same environment: :data:`GPU_RTOL` (1e-4), stated, not measured (the
machine this was built on has no GPU). `rtol` overrides either.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_ft import environment
from raytune_ft.checkpoint import CONFIG
from raytune_ft.errors import UserError
from raytune_ft.model.weights import absolute, classify
from raytune_ft.paths import is_uri
from raytune_ft.run_folder import open_run
from raytune_ft.runs import HISTORY_KEYS, TUNE_DIR, Echo, TrialRecord, read_records
from raytune_ft.spec.schema import Spec
from raytune_ft.tables import text_table

__all__ = ["COMPARED", "ENV_RTOL", "GPU_RTOL", "Outcome", "Row", "compare",
           "fingerprint_changes", "first_difference", "recorded_environment", "recorded_history",
           "reproduce", "trial_device", "trial_record"]

# The figures a trial reports that depend on training alone (`lr` follows from the schedule,
# `images_per_s` and the times from the machine's load).
COMPARED = ("train_loss", "val_loss", "val_acc")
# Relative tolerance on GPU (see the module docstring); on CPU in the recorded environment
# it is 0: equal to the last bit.
GPU_RTOL = 1e-4
# Relative tolerance on CPU in another environment, or one not recorded. Across CPU kinds the
# figures differ in the last few bits (the rtft 0.1.0 fixture: train_loss by 8e-8 relative on
# another CPU); 1e-4 passes that and still fails a change to the training itself, which moves
# a loss in its third or fourth digit.
ENV_RTOL = 1e-4
# How many known trial ids an "unknown trial" message lists.
_KNOWN_SHOWN = 5
# What data.json's fields mean, for a refusal that says what changed.
_FIELD_HINTS = {
    "sha256": "hash of the pixels, or of the file names, sizes and times, and the split indices",
    "classes": "class names", "files": "number of image files",
    "preloaded": "decoded in memory rather than streamed",
}


# --------------------------------------------------------------------------------------------
# The trial and what it recorded
# --------------------------------------------------------------------------------------------
def _folder_record(folder: Path) -> TrialRecord | None:
    """A trial read from Ray's own folder (`tune/trial_<id>/`: params.json, result.json),
    for runs without trials.json (an interrupted search, runs of rtft 0.1.0)."""
    params = folder / "params.json"
    if not params.is_file():
        return None
    history = []
    results = folder / "result.json"
    if results.is_file():
        for line in results.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                history.append({k: row[k] for k in HISTORY_KEYS if k in row})
    return TrialRecord(trial_id=folder.name.removeprefix("trial_"),
                       params=json.loads(params.read_text()), history=history)


def _records(run_dir: Path) -> dict[str, TrialRecord]:
    """Every trial the run knows: trials.json's, then any of Ray's trial folders it lacks."""
    out: dict[str, TrialRecord] = {}
    path = run_dir / "trials.json"
    if path.is_file():
        try:
            out = {r.trial_id: r for r in read_records(path)}
        except (ValueError, TypeError) as e:
            raise UserError(f"{path} is not a trials file rtft wrote ({e})") from e
    for folder in sorted((run_dir / TUNE_DIR).glob("trial_*")):
        tid = folder.name.removeprefix("trial_")
        if tid not in out and (rec := _folder_record(folder)) is not None:
            out[tid] = rec
    return out


def trial_record(run_dir: Path, trial_id: str) -> TrialRecord:
    """The trial `trial_id` of the run; none: a :class:`UserError` listing a few known ids."""
    records = _records(run_dir)
    if trial_id in records:
        return records[trial_id]
    known = sorted(records)
    if not known:
        raise UserError(f"{run_dir} holds no trials (no trials.json, no {TUNE_DIR}/trial_*/)")
    more = f", … ({len(known)} trials; `rtft results {run_dir}` lists them)" \
        if len(known) > _KNOWN_SHOWN else ""
    raise UserError(f"no trial {trial_id!r} in {run_dir}; known trials: "
                    f"{', '.join(known[:_KNOWN_SHOWN])}{more}")


def recorded_history(record: TrialRecord) -> list[dict[str, Any]]:
    """The trial's reported epochs, one row each, in order. A trial retried from a checkpoint
    (`run.max_failures`) reports some epochs twice: the later report is the one it went on
    from."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for h in record.history:
        if h.get("epoch") is not None:
            by_epoch[int(h["epoch"])] = h
    return [by_epoch[e] for e in sorted(by_epoch)]


# Where the search ran a trial (re-exported: the rule lives with what records it).
trial_device = environment.trial_device


def _read_json(path: Path, *, first_line: bool = False) -> Any:
    """A JSON file's value (its first line's: Ray's result.json), None when unreadable."""
    try:
        with open(path) as f:
            return json.loads(f.readline() if first_line else f.read())
    except (OSError, ValueError):
        return None


def recorded_environment(run_dir: Path, record: TrialRecord
                         ) -> tuple[dict[str, Any] | None, str]:
    """(the environment trial `record` trained in, where it was read), or (None, why not).

    First the trial's own, which its trainer wrote into each checkpoint's config.json: its
    last checkpoint in the run folder (`tune/trial_<id>/`: where the folder is now), else the
    checkpoint trials.json names; then the run's environment.json (the search's process:
    the trials' own on one machine; not when Ray says the trial ran on another host); none
    for runs of rtft before either was recorded."""
    folder = run_dir / TUNE_DIR / f"trial_{record.trial_id}"
    candidates = sorted(folder.glob("checkpoint_*"), reverse=True)
    if record.best_checkpoint and not is_uri(record.best_checkpoint):
        candidates.append(Path(record.best_checkpoint))
    for ckpt in candidates:
        config = _read_json(ckpt / CONFIG)
        if isinstance(config, dict) and isinstance(config.get("environment"), dict):
            return config["environment"], str(ckpt / CONFIG)
    env, run_file = environment.read_run(run_dir), run_dir / environment.RUN_FILE
    first = _read_json(folder / "result.json", first_line=True)
    host = first.get("hostname") if isinstance(first, dict) else None
    if env is not None and env.get("host") and host and host != env["host"]:
        return None, f"{run_file} is the search's, on {env['host']}; the trial ran on {host}"
    if env is not None and host is None:  # s3:// / gs:// runs: Ray's result.json not here
        return None, (f"{run_file} is the search's, and where the trial ran is not recorded "
                      f"here (no {folder.name}/result.json)")
    if env is not None:
        return env, str(run_file)
    return None, (f"none recorded: no environment in the trial's checkpoints, no "
                  f"{environment.RUN_FILE}; a run of an rtft before they were recorded")


# --------------------------------------------------------------------------------------------
# The data and the weights, checked before any training
# --------------------------------------------------------------------------------------------
_ABSENT = object()


def _short(value: Any) -> str:
    text = json.dumps(value) if value is not _ABSENT else "absent"
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the fingerprint in data.json and the data's fingerprint now, one
    phrase per field (`sha256: recorded "a1…", now "b2…" (hash of …)`); empty when equal."""
    current = json.loads(json.dumps(current))  # as data.json holds it: lists, plain numbers
    changes = []
    for key in [*recorded, *(k for k in current if k not in recorded)]:
        was, now = recorded.get(key, _ABSENT), current.get(key, _ABSENT)
        if was != now:
            hint = f" ({_FIELD_HINTS[key]})" if key in _FIELD_HINTS else ""
            changes.append(f"{key}: recorded {_short(was)}, now {_short(now)}{hint}")
    return changes


def _check_data(run_dir: Path, spec: Spec) -> Any:
    """The trial's data prepared again; refused when its fingerprint is not data.json's."""
    from raytune_ft.data import prepare, recorded_fingerprint

    path = run_dir / "data.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: without the data fingerprint the search recorded, "
                        f"a reproduction could not tell a training difference from a data one")
    recorded = recorded_fingerprint(json.loads(path.read_text()), spec.data.image_size)
    splits = prepare(spec.data)
    changes = fingerprint_changes(recorded, splits.fingerprint)
    if changes:
        raise UserError(f"the data of {spec.data.source!r} is not what the search trained on "
                        f"({path}): " + "; ".join(changes)
                        + ". Restore that data to reproduce this trial")
    return splits


def _weights(spec: Spec) -> str:
    """The weights value as a trial got it (search/trainable.py: a file made absolute),
    checked to exist here before the data is read; an `rtft:` backbone must be cached (the
    trainer resolves it: the one the search built, never a new one)."""
    from raytune_ft.model.build import resolve_weights

    value = absolute(spec.model.weights)
    ref = classify(value)
    if ref.is_path and not Path(value).expanduser().exists():
        raise UserError(f"the weights {value!r} the run's spec names are not here (a relative "
                        f"path is read from the folder you run rtft in: run it where the "
                        f"search ran)", field="model.weights")
    resolve_weights(value, spec.model.arch, spec.data.image_size)  # refuses an unbuilt one
    return value


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One figure of one epoch: what the trial reported and what the reproduction got."""

    epoch: int
    metric: str
    recorded: float | None
    reproduced: float | None
    ok: bool

    @property
    def diff(self) -> float | None:
        """reproduced − recorded (None when either is missing)."""
        if self.recorded is None or self.reproduced is None:
            return None
        return self.reproduced - self.recorded


def _same(recorded: Any, reproduced: Any, rtol: float) -> bool:
    if recorded is None or reproduced is None:
        return recorded is None and reproduced is None
    a, b = float(recorded), float(reproduced)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(b - a) <= rtol * abs(a)


def compare(recorded: list[dict[str, Any]], reproduced: list[dict[str, Any]], *,
            rtol: float = 0.0) -> list[Row]:
    """One :class:`Row` per recorded epoch and metric of :data:`COMPARED`, in order; a figure
    matches when equal, or within `rtol` relative of the recorded one. An epoch the
    reproduction did not reach (it diverged sooner) is a mismatch."""
    got = {int(h["epoch"]): h for h in reproduced}
    rows = []
    for h in sorted(recorded, key=lambda h: int(h["epoch"])):
        epoch = int(h["epoch"])
        for m in COMPARED:
            a, b = h.get(m), got.get(epoch, {}).get(m)
            rows.append(Row(epoch, m, a, b, _same(a, b, rtol)))
    return rows


def first_difference(rows: list[Row]) -> Row | None:
    """The first row (by epoch, then metric) that does not match, or None."""
    return next((r for r in rows if not r.ok), None)


@dataclass
class Outcome:
    """A reproduction: the trial, where it ran, the tolerance, the rows compared, and whether
    the environment was the recorded one (`same`), another (`different`, with `changes`:
    :func:`raytune_ft.environment.differences`) or not recorded (`unknown`)."""

    trial_id: str
    device: str
    rtol: float
    rows: list[Row] = field(default_factory=list)
    environment: str = "unknown"
    changes: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        """`cpu, same environment`, `cpu, other environment`, `cpu, environment unknown`."""
        return f"{self.device}, " + {"same": "same environment",
                                     "different": "other environment"}.get(
            self.environment, "environment unknown")

    @property
    def first_difference(self) -> Row | None:
        return first_difference(self.rows)

    @property
    def matched(self) -> bool:
        return bool(self.rows) and self.first_difference is None

    def table(self) -> list[str]:
        """epoch | metric | recorded | reproduced | diff | match/DIFFERS, as text lines."""
        def num(v: float | None) -> str:
            return "-" if v is None else repr(float(v))  # every digit: "exact" means exact

        body = [[str(r.epoch), r.metric, num(r.recorded), num(r.reproduced),
                 "-" if r.diff is None else ("0" if r.diff == 0 else f"{r.diff:+.3g}"),
                 "match" if r.ok else "DIFFERS"] for r in self.rows]
        return [ln.rstrip() for ln in
                text_table(["epoch", "metric", "recorded", "reproduced", "diff", ""], body)]

    def verdict(self) -> str:
        """One line: the trial reproduces, or the first epoch and metric that differ."""
        how = "exactly" if self.rtol == 0 else f"within rtol {self.rtol:g}"
        bad = self.first_difference
        if bad is None:
            exact = sum(r.diff == 0 for r in self.rows)
            of = f" ({exact} of them exactly)" if self.rtol else ""
            return (f"trial {self.trial_id} reproduces on {self.where}: all {len(self.rows)} "
                    f"figures match {how}{of}")
        return (f"trial {self.trial_id} does not reproduce on {self.where}: first difference "
                f"at epoch {bad.epoch}, {bad.metric} (recorded {bad.recorded!r}, reproduced "
                f"{bad.reproduced!r}; required: {how})")


# --------------------------------------------------------------------------------------------
# Training again
# --------------------------------------------------------------------------------------------
class _Enough(Exception):
    """Raised from the report callback after the trial's last recorded epoch. The trainer runs
    `train.max_epochs`, which must stay as the search had it (the LR schedule's length comes
    from it), so a trial ASHA stopped early is stopped here at the same epoch."""


def _train_epochs(spec: Spec, params: dict[str, Any], splits: Any, epochs: int,
                  echo: Echo) -> list[dict[str, Any]]:
    """The trial's configuration trained for its first `epochs` epochs: each one's metrics."""
    from raytune_ft.space import hparams_for
    from raytune_ft.train import train

    hp = hparams_for(spec, params)
    threads = max(1, int(spec.run.resources.cpu))  # the trainable's rule
    got: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        del folder
        got.append(dict(metrics))
        echo(f"epoch {metrics['epoch']}/{epochs}: " + ", ".join(
            f"{m} {metrics[m]:.6g}" for m in COMPARED))
        if len(got) >= epochs:
            raise _Enough

    # No checkpoints: nothing is kept, and writing them touches no RNG and no figure.
    with contextlib.suppress(_Enough):
        train(hp, spec=spec, data=splits.without_test(), report=report, num_threads=threads,
              checkpoints=False)
    return got


def _tolerance(device: str, recorded: dict[str, Any] | None, source: str,
               now: dict[str, Any], rtol: float | None, echo: Echo
               ) -> tuple[float, str, list[str]]:
    """(rtol, `same`/`different`/`unknown`, differences): the trial's recorded environment
    compared with this one (`now`), said in a line or more, and the tolerance that follows
    (see the module docstring); `rtol`, when given, holds whatever the environment."""
    if recorded is None:
        state, changes = "unknown", []
    else:
        changes = environment.differences(recorded, now)
        state = "different" if changes else "same"
    default = GPU_RTOL if device != "cpu" else (0.0 if state == "same" else ENV_RTOL)
    rtol = default if rtol is None else rtol
    how = "exactly" if rtol == 0 else f"within rtol {rtol:g} (relative, per figure)"
    how += " (--rtol)" if rtol != default else ""
    if state == "same":
        why = "; GPU kernels are not deterministic" if device != "cpu" and rtol else ""
        echo(f"environment: the same as recorded ({source}): comparing {how}{why}")
    elif state == "different":
        echo(f"environment: not the one recorded ({source}): comparing {how}; it differs in")
        for line in changes:
            echo(f"  {line}")
    else:
        echo(f"environment: unknown ({source}): comparing {how}")
    return rtol, state, changes


def reproduce(run_dir: Path, trial_id: str, *, rtol: float | None = None, echo: Echo = print,
              teacher: Callable[[Path, Spec, Any, Echo], Any] | None = None) -> Outcome:
    """Train trial `trial_id` of the run in `run_dir` again, outside Ray, for the epochs it
    ran, and compare its figures with the recorded ones: exactly on a CPU in the environment
    the trial recorded; within :data:`ENV_RTOL` in another environment or an unknown one,
    within :data:`GPU_RTOL` on GPU; within `rtol` when given.

    Raises :class:`UserError` (nothing trained) for an unknown trial, a trial that reported
    no epoch, data whose fingerprint changed, weights that are not here, a GPU trial on a
    machine without one, or a distilled trial without `teacher` or whose teacher changed.
    """
    record = trial_record(run_dir, trial_id)
    # The plain single-architecture spec the trial trained with (a `model.arch` choice).
    spec = open_run(run_dir).for_trial(record.params)
    history = recorded_history(record)
    if not history:
        raise UserError(f"trial {trial_id} reported no epoch"
                        + (f" (it failed: {record.error})" if record.error else "")
                        + ": there is nothing to compare")
    import torch  # here, not above: an unknown trial is answered without loading torch

    device = trial_device(spec)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trial {trial_id} ran on a GPU (run.resources.gpu: "
                        f"{spec.run.resources.gpu:g}) and this machine has none")
    if spec.model.teacher is not None and teacher is None:  # it would train without it
        raise UserError(f"trial {trial_id} was distilled from {spec.model.teacher!r}: pass "
                        f"teacher=raytune_ft.distill.reproduction_teacher", field="model.teacher")
    weights = _weights(spec)
    splits = _check_data(run_dir, spec)
    if teacher is not None and spec.model.teacher is not None:  # the data with its logits
        splits = teacher(run_dir, spec, splits, echo)
    # The spec as the trial got it (search/trainable.py), pinned to the trial's device.
    spec_json = spec.model_dump(mode="json")
    spec_json["model"]["weights"] = weights
    spec_json["train"]["device"] = device
    trial_spec = Spec.model_validate(spec_json)
    epochs = int(history[-1]["epoch"])
    echo(f"reproducing trial {trial_id} of {run_dir}: {epochs} of {spec.train.max_epochs} "
         f"epoch(s) on {device}; data matches {run_dir / 'data.json'}")
    recorded, source = recorded_environment(run_dir, record)
    # The environment the trainer will record below: the trial's device, autocast, threads.
    rtol, state, changes = _tolerance(device, recorded, source, environment.for_spec(trial_spec),
                                      rtol, echo)
    got = _train_epochs(trial_spec, record.params, splits, epochs, echo)
    return Outcome(trial_id, device, rtol, compare(history, got, rtol=rtol), state, changes)
