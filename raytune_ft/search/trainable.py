"""The trainable: what runs in a Ray worker for one trial. It calls our plain trainer.

Ray stays out of the trainer: :func:`raytune_ft.train.train` reports through a `report`
callback, which here becomes `tune.report` with a Ray Checkpoint of the epoch's folder.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from raytune_ft.data import Splits
from raytune_ft.errors import TrialOOMError
from raytune_ft.model.build import absolute_weights
from raytune_ft.search.ray_private import named_function_trainable
from raytune_ft.space import hparams_for
from raytune_ft.spec.schema import Spec
from raytune_ft.train import train


def make_report(checkpoint: Any) -> Any:
    """The trainer's `report` callback for one trial: metrics and the epoch's checkpoint
    folder go to Tune. `checkpoint` is the trial's restored checkpoint (None on a first run);
    it is unused here, and is the seam where tests wrap the callback (tests/plugins)."""
    del checkpoint

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        ckpt = tune.Checkpoint.from_directory(str(folder)) if folder else None
        tune.report(metrics, checkpoint=ckpt)

    return report


def run_trial(config: dict[str, Any], spec_json: dict,
              data: Splits | Mapping[int, ray.ObjectRef]) -> None:
    """One trial: train with `config`'s parameters, resuming from Tune's checkpoint if any.

    With `model.arch` searched, `config["arch"]` picks the network: the trial trains with the
    plain single-architecture spec of that choice (`Spec.for_trial`), on the splits of its
    input size (`data` is then keyed by image size, see `trainable_for`)."""
    for name in ("ray.train", "ray.tune"):  # one "checkpoint created" line per epoch is noise
        logging.getLogger(name).setLevel(logging.WARNING)
    spec = Spec.model_validate(spec_json).for_trial(config)
    if isinstance(data, Mapping):  # one object per input size: fetch this trial's only
        data = ray.get(data[spec.data.image_size])
    hp = hparams_for(spec, config)
    threads = max(1, int(spec.run.resources.cpu))
    checkpoint = tune.get_checkpoint()
    report = make_report(checkpoint)
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


# Ray records the trainable's name in a run's tuner.pkl, and Tuner.restore refuses a trainable
# of another name: runs written by rtft 0.1.0 recorded "_trainable", so that name stays.
run_trial.__name__ = run_trial.__qualname__ = "_trainable"
_trainable = run_trial


def trainable_for(spec: Spec, splits: Splits | Mapping[int, Splits]) -> Any:
    """`run_trial` bound to this search's spec and data (the data goes into Ray's object store
    once, without its test split), with the spec's resources per trial, as a named class.

    `splits`: the search's splits, or (`data.prepare_each`) the splits of each input size the
    architectures of a `model.arch` choice take; a single size travels as plain splits."""
    if isinstance(splits, Mapping) and len(splits) > 1:
        # Each size its own object in the store (with_parameters would put the whole mapping
        # in one, and every trial would fetch every size).
        data: Splits | dict[int, ray.ObjectRef] = {
            size: ray.put(s.without_test()) for size, s in splits.items()}
    else:
        data = (next(iter(splits.values())) if isinstance(splits, Mapping)
                else splits).without_test()
    res = spec.run.resources
    spec_json = spec.model_dump(mode="json")
    # Trials run in their own folders: a weights file named relative to where rtft was
    # started must reach them as an absolute path.
    w = spec.model.weights
    spec_json["model"]["weights"] = ({a: absolute_weights(v) for a, v in w.items()}
                                     if isinstance(w, Mapping) else absolute_weights(w))
    return _named(tune.with_resources(
        tune.with_parameters(run_trial, spec_json=spec_json, data=data),
        {"cpu": res.cpu, "gpu": res.gpu}), spec.name)


def _named(fn: Any, run: str) -> type:
    """Tune's class for `fn` (`ImplicitFunc`), renamed for Ray's dashboard and logs: class
    `RtftTrial`, shown as `rtft <run> trial <id>` in the log prefix (renewed for each trial a
    reused actor runs) and the Actors tab's Repr (Ray sets it once: the actor's first trial).
    Its trainable name stays `fn`'s, "_trainable", which Tuner.restore checks."""

    def __repr__(self: Any) -> str:  # noqa: N807
        return f"rtft {run} trial {self.trial_id}"

    return named_function_trainable(fn, "RtftTrial", __repr__, __name__)
