"""Every check `rtft search` makes before it starts Ray, in one place.

:func:`dry_run` makes all of them that write nothing, download nothing and pretrain nothing:
`rtft validate` prints the :class:`Plan` it returns, and `rtft search` calls it first, so
"validate passes" means "search launches". A dry run names what only a search then builds:
an `rtft:` backbone (pretrained on first use), torchvision weights (from the hub cache or
downloaded), the whole dataset (decoded); :func:`check_pretrained` loads those weights once in
the search's driver. What needs a running cluster (its resources when joining one, whether its
storage is shared) is checked in :mod:`raytune_ft.search.cluster` once joined.

Ray is imported here only to read the resources of a cluster named with `rtft validate
--address`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from raytune_ft import warm_start
from raytune_ft.checkpoint import file_sha256
from raytune_ft.errors import UserError, first_line
from raytune_ft.knobs import Hyperparams
from raytune_ft.model.weights import classify, torchvision_name
from raytune_ft.paths import is_uri
from raytune_ft.runs import TUNE_DIR, run_location
from raytune_ft.spec.schema import Spec, check_fit

if TYPE_CHECKING:  # portfolio sits beside this module (layer 5): imported where it is used
    from raytune_ft import portfolio as _portfolio

__all__ = ["Fit", "Machines", "ModelShape", "Plan", "check_pretrained", "check_writable",
           "dry_run", "first_missing", "local_resources", "machines", "this_machine"]

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Where the trials would run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machines:
    """Where the trials would run: total resources keyed like ``ray.cluster_resources()``
    ("CPU", "GPU") and the words that name the place in messages."""

    resources: dict[str, float]
    where: str


@dataclass(frozen=True)
class Fit:
    """How many trials run at once on :class:`Machines`: `fits` by resources alone,
    `at_once` once `run.max_concurrent_trials` caps them."""

    where: str
    fits: int
    at_once: int

    def line(self, spec: Spec) -> str:
        """One line for `rtft validate`: what a trial asks and how many run at once."""
        res = spec.run.resources
        return (f"resources: each trial asks {res.cpu:g} CPU + {res.gpu:g} GPU; {self.fits} "
                f"trial(s) fit at once on {self.where}; with run.max_concurrent_trials = "
                f"{spec.run.max_concurrent_trials}, {self.at_once} run at a time")


def local_resources() -> dict[str, float]:
    """What a local Ray started here would offer, keyed like ray.cluster_resources()."""
    import torch  # only here: counting GPUs is the one thing this needs torch for

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def this_machine() -> Machines:
    """This machine, as the local Ray that `rtft search` starts would see it."""
    have = local_resources()
    return Machines(have, f"this machine ({have['CPU']:g} CPU, {have['GPU']:g} GPU)")


def machines(spec: Spec, *, gpus: float | None = None, cpus: float | None = None,
             address: str | None = None, headers: tuple[str, ...] = ()) -> Machines:
    """Where `rtft validate` checks the fit: a cluster of the given size (`--cluster-gpus`,
    `--cluster-cpus`), the running cluster at `address` (its resources are read), else this
    machine."""
    res = spec.run.resources
    if gpus is not None or cpus is not None:
        if cpus is None and res.gpu == 0:
            raise UserError("trials ask for no GPU, so --cluster-gpus alone says nothing; "
                            "allowed: add --cluster-cpus N", field="run.resources")
        if cpus is None and (gpus or 0.0) + 1e-9 < res.gpu:
            raise UserError(f"each trial asks for {res.gpu:g} GPU, but a cluster of {gpus:g} "
                            f"GPU has fewer; Ray would leave every trial pending forever; "
                            f"allowed: gpu <= {gpus:g}", field="run.resources")
        # CPUs not given: they do not limit (a GPU cluster's usual case).
        enough = res.cpu * (int((gpus or 0.0) / res.gpu + 1e-9) if res.gpu else 1)
        parts = ([f"{gpus:g} GPU"] if gpus is not None else []) + \
            ([f"{cpus:g} CPU"] if cpus is not None else [])
        return Machines({"CPU": cpus if cpus is not None else enough, "GPU": gpus or 0.0},
                        "a cluster of " + ", ".join(parts))
    if address:
        from raytune_ft.job_env import parse_headers

        if address.startswith(("http://", "https://")):
            from raytune_ft.jobs import cluster_resources
        else:
            from raytune_ft.search.cluster import cluster_resources  # type: ignore[assignment]
        have = cluster_resources(address, parse_headers(headers))
        return Machines(have, f"the Ray cluster at {address} ({have['CPU']:g} CPU, "
                              f"{have['GPU']:g} GPU)")
    return this_machine()


# --------------------------------------------------------------------------------------------
# Where results go
# --------------------------------------------------------------------------------------------
# Room for a few checkpoints and run files; a search that fills the disk mid-way loses trials.
_MIN_FREE_BYTES = 200 * 2**20


def check_writable(path: str, field: str) -> None:
    """Refuse, before launch, a local folder that cannot be created or written (a file in the
    way, no permission, a read-only mount) or whose disk is nearly full. URIs (s3://, gs://)
    are left to the storage layer. Nothing is left behind: the probe file is removed, and the
    folder itself is not created."""
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
                        f"a folder you can write to", field=field) from e
    free = shutil.disk_usage(base).free
    if free < _MIN_FREE_BYTES:
        raise UserError(f"{str(target)!r}: the disk is full ({free / 2**20:.0f} MB free in "
                        f"{base}); allowed: a folder on a disk with at least "
                        f"{_MIN_FREE_BYTES // 2**20} MB free", field=field)


def _check_tracking(spec: Spec) -> None:
    """`track.mlflow`: a local store's folder can be written (its form was checked with the
    spec), and the optional mlflow package is installed (found, not imported)."""
    import importlib.util

    from raytune_ft.spec.track import local_store_path

    ml = spec.track.mlflow
    if ml is None:
        return
    path = local_store_path(ml.uri)
    if path is not None:
        folder = Path(path) if ml.uri.startswith("file:") else Path(path).parent
        check_writable(str(folder), "track.mlflow.uri")
    if importlib.util.find_spec("mlflow") is None:
        raise UserError("the mlflow package is not installed; allowed: pip install -e "
                        "'.[mlflow]' (or pip install mlflow), or a spec without track.mlflow",
                        field="track.mlflow")


def first_missing(path: Path) -> Path | None:
    """The topmost missing folder on the way to `path` (None when `path` exists)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def _check_outputs(spec: Spec) -> None:
    if is_uri(spec.promote.dir):
        raise UserError(f"{spec.promote.dir!r}: promoted models are written to a local or "
                        f"mounted folder; allowed: a path (on a cluster job, one on shared "
                        f"storage)", field="promote.dir")
    check_writable(spec.run.storage_path, "run.storage_path")
    check_writable(spec.promote.dir, "promote.dir")


# --------------------------------------------------------------------------------------------
# The weights and the model
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What `rtft validate` shows of the model: its stages (what `freeze_depth` counts) with
    their parameter counts, the blocks `reinit_blocks` counts, the head that is replaced, and
    the total."""

    arch: str
    stages: list[tuple[str, int]]
    blocks: int
    head_path: str
    total_params: int

    def table(self) -> str:
        """The stages as `rtft validate` prints them."""
        lines = [f"{self.arch} stages (freeze_depth=k freezes the first k):"]
        for i, (name, n) in enumerate(self.stages, 1):
            lines.append(f"  {i:>2}. {name:<14} {n:>12,} params")
        lines.append(f"      head ({self.head_path}) replaced; total {self.total_params:,} "
                     f"params; reinit_blocks counts {self.blocks} blocks")
        return "\n".join(lines)


def _check_weights_name(spec: Spec) -> str:
    """Check what a weights value names without loading it, and say what it is (one line).
    A file is only named here; :func:`_check_model` loads it."""
    from raytune_ft.model.build import recipe_path

    m, ref = spec.model, classify(spec.model.weights)
    if ref.kind == "none":
        return "none (the backbone starts from random weights)"
    if ref.kind == "recipe":
        path = recipe_path(ref.recipe, m.arch, spec.data.image_size)  # refuses unknown recipes
        return (f"{ref.value}, cached at {path}" if path.exists() else
                f"{ref.value}, not built yet: rtft search pretrains it once (cached at {path})")
    if ref.kind == "torchvision":
        if m.factory:  # the factory network is not torchvision's `arch`: its names do not apply
            raise UserError(f"{m.weights!r}: a model.factory network takes weights from a file "
                            f"(.pth, .safetensors, promoted folder) or none",
                            field="model.weights")
        name = torchvision_name(m.arch, m.weights)  # the name only: nothing is downloaded
        return f"torchvision {m.arch} {name} (from the hub cache, else downloaded by search)"
    what = "promoted model" if ref.kind == "promoted" else "file"
    return f"{what} {ref.value} (loaded as plain tensors: it fits {m.arch})"


def _check_ranges(spec: Spec, stages: list[str], blocks: int, *, choice: bool = False) -> None:
    """Refuse `freeze_depth` / `reinit_blocks` values past what the architecture has: the
    trainer would clamp them silently, so part of the search would repeat the same trial.
    `choice`: the architecture is one of a choice, which a hint then names ways around."""
    limits = {
        "freeze_depth": (len(stages), f"{len(stages)} stages ({', '.join(stages)})"),
        "reinit_blocks": (blocks, f"{blocks} re-initialisable blocks in its {len(stages)} "
                                  f"stages"),
    }
    for knob, (top, what) in limits.items():
        param = spec.search.get(knob)
        if param is None:
            continue
        for key, value in param.candidates().items():
            if isinstance(value, int) and value > top:
                which = "" if key == "value" else f" ({key})"
                hint = (f" for {spec.model.arch} (gate {knob} with when: {{arch: [...]}}"
                        + (", or use freeze_fraction, the same share of every network's "
                           "stages" if knob == "freeze_depth" else "") + ")") if choice else ""
                raise UserError(f"{knob} {value}{which} is more than {spec.model.arch} has: "
                                f"{spec.model.arch} has {what}; allowed: 0..{top}{hint}",
                                field=f"search.{knob}")


def _per_arch(spec: Spec, check: Callable[[Spec], T]) -> list[T]:
    """`check` run on the single-arch spec of each architecture, in the spec's order. A
    refusal of one architecture's weights names its entry when weights are given per
    architecture (`model.weights.<arch>`)."""
    out = []
    for arch in spec.archs:
        try:
            out.append(check(spec.for_arch(arch)))
        except UserError as e:
            if e.field == "model.weights" and isinstance(spec.model.weights, dict):
                e.field = f"model.weights.{arch}"
            raise
    return out


def _check_model(spec: Spec, num_classes: int, *, choice: bool = False) -> ModelShape:
    """Build the model once (no weights, or the spec's weights file, loaded as plain tensors
    and fitted to the architecture) and check the knobs that count its stages and blocks
    (`choice`: the architecture is one of a choice)."""
    from raytune_ft.model.build import build_model, count_params

    ref = classify(spec.model.weights)
    # A file (or a URI, which no loader reads and so is refused as missing) is loaded here;
    # named weights are loaded by check_pretrained, in the search only.
    weights = spec.model.weights if ref.is_path else "none"
    built = build_model(spec.model, num_classes, Hyperparams(), weights)
    names = [s.name for s in built.stages]
    blocks = sum(len(s.blocks()) for s in built.stages)
    _check_ranges(spec, names, blocks, choice=choice)
    return ModelShape(spec.model.arch,
                      [(s.name, sum(p.numel() for p in s.parameters())) for s in built.stages],
                      blocks, built.head_path, count_params(built.model))


def check_pretrained(spec: Spec, num_classes: int) -> None:
    """In the search's driver, before any trial: load the weights a dry run could only name
    (the `rtft:` backbone, built by then; torchvision weights, from the hub cache or
    downloaded) into the model once, so a download that fails or a backbone that does not fit
    is refused before Ray starts. Files were loaded by :func:`dry_run` already."""
    from raytune_ft.model.build import build_model, resolve_weights

    def check(one: Spec) -> None:
        if classify(one.model.weights).kind not in ("recipe", "torchvision"):
            return
        weights = resolve_weights(one.model.weights, one.model.arch, one.data.image_size)
        build_model(one.model, num_classes, Hyperparams(), weights)

    _per_arch(spec, check)  # every architecture of a choice


# --------------------------------------------------------------------------------------------
# The dry run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What a dry run found, for `rtft validate` to print: the data in a line, the weights in
    a line per architecture, each architecture's model shape, and how many trials fit at once
    (None: the search checks that once it has joined its cluster); the portfolio mapped onto
    the space (None: `searcher.portfolio: none`, or a resume), and how many configurations
    the study tries before it (the baseline, the warm start's)."""

    data: str
    weights: str
    models: tuple[ModelShape, ...]
    fit: Fit | None
    portfolio: _portfolio.Plan | None = None
    before_portfolio: int = 0

    @property
    def model(self) -> ModelShape:
        """The shape of the (first) architecture."""
        return self.models[0]

    def tables(self) -> str:
        """Every architecture's stages, as `rtft validate` prints them."""
        return "\n\n".join(m.table() for m in self.models)


_SOME_CLASSES = 10  # a source's class count unknown until read: the head's size checks nothing


def _check_teacher(spec: Spec, num_classes: int | None) -> None:
    """`model.teacher`: a promoted folder (nothing loaded), its weights intact, its classes
    counted (names: by the search) and size the data's; no mixup/cutmix searched beside it."""
    path = spec.model.teacher
    if path is None:
        return
    folder = Path(path).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text())
        classes = list(config["classes"])
        recorded = json.loads((folder / "metrics.json").read_text()).get("sha256")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path!r} is not a promoted rtft model ({first_line(e)}); "
                        f"allowed: a folder models/<name>/vN written by promotion",
                        field="model.teacher") from e
    weights = folder / "model.safetensors"  # what the search's load_promoted checks
    if not weights.is_file() or file_sha256(weights) != recorded:
        raise UserError(f"{weights}: sha256 does not match metrics.json (corrupted or "
                        f"replaced); allowed: a folder as promotion wrote it",
                        field="model.teacher")
    t_size = (config.get("spec") or {}).get("data", {}).get("image_size")
    size = spec.data.image_size
    if None not in (t_size, size) and int(t_size) != size:  # distill.py refuses it too
        raise UserError(f"{path!r} takes {t_size}-px images, the data here is {size} px; set "
                        f"data.image_size: {t_size} (resizing for a teacher is not supported)",
                        field="model.teacher")
    if num_classes is not None and len(classes) != num_classes:
        shown = ", ".join(classes[:6]) + (", …" if len(classes) > 6 else "")
        raise UserError(f"{path!r} predicts {len(classes)} classes [{shown}], the data has "
                        f"{num_classes}; allowed: a teacher promoted on the same classes",
                        field="model.teacher")
    for knob in ("mixup_alpha", "cutmix_alpha"):
        param = spec.search.get(knob)
        if param is not None and any(isinstance(v, (int, float)) and v > 0
                                     for v in param.candidates().values()):
            raise UserError(f"{knob} > 0 with model.teacher: the teacher's logits are of the "
                            f"unmixed images; allowed: distillation or {knob}, not both",
                            field=f"search.{knob}")


def _check_new_run(spec: Spec) -> None:
    """A search without --resume never writes over an existing run (a local run folder holding
    Ray's experiment; an s3:// / gs:// run is checked by the search, which reads the bucket)."""
    loc = run_location(spec)
    if loc.remote is None and (loc.local / TUNE_DIR / "tuner.pkl").exists():
        raise UserError(f"a run named {spec.name!r} already exists in {loc.local.parent}; pass "
                        f"--resume to continue it, or --set name=... for a new run", field="name")


def dry_run(spec: Spec, on: Machines | None, *, warm: bool = True,
            resume: bool = False) -> Plan:
    """Every check `rtft search` makes before it starts Ray, writing, downloading and
    pretraining nothing; raises :class:`UserError` naming the field.

    In order, cheapest first: the results folders can be written; MLflow tracking
    (`track.mlflow`) can write its local store and its package is installed; one trial fits `on`
    (None: a cluster the search joins, checked then); the weights name something that exists (an
    `rtft:` recipe, torchvision weights of the architecture); the data is where the spec says
    (no image is read); the warm start's earlier runs are rtft runs of the same metric over some
    of the same parameters; the portfolio file (`searcher.portfolio`) holds valid knob values
    (not on a resume, whose study has its trials already); the model builds, a weights file
    loads as plain tensors and fits it, and `freeze_depth` / `reinit_blocks` stay within its
    stages and blocks. With a choice of architectures, the weights and the model are checked for
    each one, as the spec of that architecture alone (:meth:`Spec.for_arch`).
    """
    from raytune_ft.sources import check_source

    _check_outputs(spec)
    _check_tracking(spec)
    if not resume:
        _check_new_run(spec)
    fit = None
    if on is not None:
        fits = check_fit(spec, on.resources, where=on.where)
        fit = Fit(on.where, fits, min(fits, spec.run.max_concurrent_trials))
    # Per architecture of a choice (one line each, aligned under `weights: `).
    named = _per_arch(spec, _check_weights_name)
    weights = named[0] if not spec.arch_searched else "\n         ".join(
        f"{a}: {w}" for a, w in zip(spec.archs, named, strict=True))
    num_classes = check_source(spec.data)
    _check_teacher(spec, num_classes)
    warm_plan = None
    if warm:  # `rtft search` reads them once it knows the run is new (a resume needs none)
        warm_plan = warm_start.plan_for(spec)  # every earlier run it names is readable and fits
    pf = None
    if not resume:
        from raytune_ft import portfolio

        pf = portfolio.plan_for(spec, warm=warm_plan.enqueue if warm_plan else ())
    before = int(spec.searcher.baseline_first) + len(warm_plan.enqueue if warm_plan else ())
    shapes = _per_arch(spec, lambda one: _check_model(one, num_classes or _SOME_CLASSES,
                                                      choice=spec.arch_searched))
    d = spec.data
    where = f" in {Path(d.root).expanduser().resolve()}" if d.root else " (built in)"
    found = (f": {num_classes} classes" if num_classes is not None
             else " (its files are read by rtft search)")
    return Plan(f"{d.source}{where}{found}", weights, tuple(shapes), fit, pf, before)
