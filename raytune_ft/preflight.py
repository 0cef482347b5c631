"""Every check `rtft search` makes before it starts Ray, in one place, without Ray.

`rtft validate` runs the same checks (:func:`before_launch`), so "validate passes" means
"search launches". What needs a running cluster (its resources when joining one, whether
its storage is shared) is checked in :mod:`raytune_ft.search.cluster` once joined.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from raytune_ft.errors import UserError
from raytune_ft.paths import is_uri
from raytune_ft.spec import Hyperparams, Spec, check_fit


def before_launch(spec: Spec, *, local: bool) -> None:
    """The checks that need neither data nor a model: where results and models go, and, for
    a local Ray (`local`), whether one trial fits this machine."""
    if is_uri(spec.promote.dir):
        raise UserError(f"{spec.promote.dir!r}: promoted models are written to a local or "
                        f"mounted folder; allowed: a path (on a cluster job, one on shared "
                        f"storage)", field="promote.dir")
    check_writable(spec.run.storage_path, "run.storage_path")
    check_writable(spec.promote.dir, "promote.dir")
    if local:  # the Ray we would start gets this machine's CPUs and GPUs
        check_fit(spec, local_resources(), where="this machine")


def check_model(spec: Spec, num_classes: int) -> None:
    """Build the model with the spec's weights once in the driver: a missing weights file or
    one that does not fit the architecture is refused before any trial starts."""
    from raytune_ft.models import build_model, resolve_weights

    weights = resolve_weights(spec.model.weights, spec.model.arch, spec.data.image_size)
    built = build_model(spec.model, num_classes, Hyperparams(), weights)
    depth = spec.search.get("freeze_depth")
    top = max(depth.candidates().values(), default=0) if depth is not None else 0
    if isinstance(top, int) and top > len(built.stages):
        raise UserError(f"{spec.model.arch} has {len(built.stages)} stages "
                        f"({', '.join(s.name for s in built.stages)}); allowed: 0.."
                        f"{len(built.stages)}", field="search.freeze_depth")


# Room for a few checkpoints and run files; a search that fills the disk mid-way loses trials.
_MIN_FREE_BYTES = 200 * 2**20


def check_writable(path: str, field: str) -> None:
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
        raise UserError(f"{str(target)!r} cannot be a folder: {str(base)!r} is a file; "
                        f"allowed: a folder path (created if missing)", field=field)
    try:  # as root, permission bits say nothing: try it
        fd, probe = tempfile.mkstemp(prefix=".rtft-write-check-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{str(target)!r} is not writable ({e.strerror} in {base}); allowed: "
                        f"a folder you can write to", field=field) from None
    free = shutil.disk_usage(base).free
    if free < _MIN_FREE_BYTES:
        raise UserError(f"{str(target)!r}: the disk is full ({free / 2**20:.0f} MB free in "
                        f"{base}); allowed: a folder on a disk with at least "
                        f"{_MIN_FREE_BYTES // 2**20} MB free", field=field)


def local_resources() -> dict[str, float]:
    """What a local Ray started here would offer, keyed like ray.cluster_resources()."""
    import torch  # only here: counting GPUs is the one thing this needs torch for

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def first_missing(path: Path) -> Path | None:
    """The topmost missing folder on the way to `path` (None when `path` exists)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing



@dataclass(frozen=True)
class ModelShape:
    """What `rtft validate` shows of the model: its stages (what `freeze_depth` counts) with
    their parameter counts, the head that is replaced, and the total."""

    arch: str
    stages: list[tuple[str, int]]
    head_path: str
    total_params: int


def model_shape(spec: Spec, num_classes: int = 10) -> ModelShape:
    """The spec's model built without weights, described (stages, head, parameters)."""
    from raytune_ft.models import build_model, count_params

    built = build_model(spec.model, num_classes, Hyperparams(), "none")
    return ModelShape(spec.model.arch,
                      [(s.name, sum(p.numel() for p in s.parameters())) for s in built.stages],
                      built.head_path, count_params(built.model))
