"""The search spec's schema: pydantic models of every section, their defaults and the checks
that span fields. Every other module takes a :class:`Spec` (or the :class:`Hyperparams` of one
trial) and may trust it.

The knobs a trial is trained with and the `search:` parameters that vary them are
:mod:`raytune_ft.knobs`; reading spec files (YAML, `--set`, error lines) is
:mod:`raytune_ft.spec.yaml_io`; what a `model.weights` value names is
:mod:`raytune_ft.model.weights`; the `searcher:` and `scheduler:` sections are
:mod:`raytune_ft.spec.searcher`.
Neither importing this module nor validating a spec imports torch or torchvision: names and
crop sizes come from :mod:`raytune_ft.model.registry`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raytune_ft.errors import UserError
from raytune_ft.knobs import (
    Choice,
    FieldError,
    SearchParam,
    Strict,
    arch_param,
    check_params,
    params_for_arch,
)
from raytune_ft.model import registry as tv_registry
from raytune_ft.model.weights import weights_meta
from raytune_ft.spec.searcher import SchedulerSpec, SearcherSpec, check_scheduler
from raytune_ft.spec.track import TrackSpec

__all__ = [
    "BUILTIN_SOURCES", "METRICS", "SOURCES", "DataSpec", "ModelSpec", "PromoteSpec",
    "Resources", "RunSpec", "Spec", "TrainSpec", "check_fit",
]

BUILTIN_SOURCES = ("digits", "mnist")
# Every `data.source`: its natural image size (when neither the spec nor the weights' metadata
# give one) and whether a horizontal flip keeps the label (never for digits or signs).
# Lower case: built in, offline; `imagefolder`: the user's images; capitalised: torchvision
# datasets of that name, read from `data.root`.
SOURCES: dict[str, tuple[int, bool]] = {
    "digits": (32, False), "mnist": (32, False), "imagefolder": (224, True),
    "CIFAR10": (32, True), "CIFAR100": (32, True), "MNIST": (32, False),
    "FashionMNIST": (32, True), "KMNIST": (32, False), "SVHN": (32, False),
    "STL10": (96, True), "GTSRB": (32, False), "EuroSAT": (64, True),
    "Flowers102": (224, True), "OxfordIIITPet": (224, True), "DTD": (224, True),
    "Food101": (224, True),
}
# Metrics the trainer reports each epoch, and which way is better.
METRICS = {"val_acc": "max", "val_loss": "min", "train_loss": "min"}


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def _unknown_arch(arch: str) -> str:
    known = tv_registry.archs()  # without importing torchvision (see tv_registry)
    near = difflib.get_close_matches(arch, known, n=3)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return (f"unknown architecture {arch!r}; allowed: a torchvision classification model name "
            f"such as resnet18, resnet50, efficientnet_b0, convnext_tiny, vit_b_16, or "
            f"model.factory for other models.{hint}")


class ModelSpec(Strict):
    # One torchvision architecture, or `{space: choice, values: [...]}` of several: the search
    # then samples `arch` first, like any other parameter (Spec.params, Spec.for_arch).
    arch: str | Choice = "resnet18"
    # torchvision weights name (DEFAULT, IMAGENET1K_V1), a local .pth/.safetensors file or
    # promoted model folder, `rtft:mnist` (a backbone rtft pretrains itself, offline), or none.
    # With a choice of architectures: one value for all of them, or a mapping arch → value.
    weights: str | dict[str, str] = "none"
    # A model from outside torchvision: "package.module:function", called with this `model:`
    # section as a dict; `arch` is then only a label (see models.py, "factory protocol").
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # free-form, for the factory
    # A promoted model folder (models/<name>/vN) to distill from: its logits on the training
    # images are computed once, before the trials (knobs distill_alpha, distill_temperature).
    teacher: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_arch(cls, data: Any) -> Any:
        # Before the fields: a misspelt architecture is the error to name, not what follows.
        if not isinstance(data, dict):
            return data
        arch = arch_param(data.get("arch", "resnet18"))
        if isinstance(arch, Choice) and data.get("factory") is not None:
            raise FieldError(("model", "factory"),
                             "model.factory builds one network, and model.arch is a choice; "
                             "allowed: a plain model.arch label with model.factory, or a "
                             "choice of torchvision architectures without it")
        if data.get("factory") is None:
            searched = isinstance(arch, Choice)
            for i, a in enumerate(arch.values if searched else [arch]):
                if a not in tv_registry.archs():
                    loc = ("model", "arch", "values", i) if searched else ("model", "arch")
                    raise FieldError(loc, _unknown_arch(a))
        return {**data, "arch": arch}

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"{v!r} is not 'package.module:function'; allowed: an importable "
                             f"module path, a colon, and a function name")
        return v

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_per_arch(cls, v: Any, info: ValidationInfo) -> Any:
        if not isinstance(v, dict):
            if isinstance(v, str):
                return v
            raise ValueError(f"got {v!r}; allowed: a weights value (DEFAULT, IMAGENET1K_V1, a "
                             f"file, rtft:mnist or none), or a mapping architecture → value")
        arch = info.data.get("arch")  # declared before `weights`; absent when it was refused
        archs = [] if arch is None else ModelSpec.model_construct(arch=arch).archs
        for key, value in v.items():
            if key not in archs and arch is not None:
                raise FieldError(("model", "weights", str(key)),
                                 f"{key!r} is not an architecture of model.arch; allowed: one "
                                 f"entry per architecture ({', '.join(archs)})")
            if not isinstance(value, str):
                raise FieldError(("model", "weights", str(key)),
                                 f"got {value!r}; allowed: a weights value (DEFAULT, a file, "
                                 f"rtft:mnist or none)")
        if missing := [a for a in archs if a not in v]:
            raise FieldError(("model", "weights"),
                             f"no weights for {', '.join(missing)}; allowed: one value for "
                             f"every architecture, or a mapping with one entry per "
                             f"architecture ({', '.join(archs)})")
        # One architecture: its one value, as every reader of a single-arch spec expects.
        return v if isinstance(arch, Choice) or arch is None else v[arch]

    @property
    def archs(self) -> list[str]:
        """The architectures: the choice's values, or the one name."""
        return ([str(a) for a in self.arch.values] if isinstance(self.arch, Choice)
                else [self.arch])

    def weights_for(self, arch: str) -> str:
        """The `weights:` value of architecture `arch`."""
        return self.weights[arch] if isinstance(self.weights, dict) else self.weights


class DataSpec(Strict):
    source: str = "digits"  # a key of SOURCES
    # imagefolder: a folder of class folders; torchvision datasets: their root folder.
    root: str | None = None
    # imagefolder only: separate validation / test trees (else split off `root`, stratified).
    val_root: str | None = None
    test_root: str | None = None
    download: bool = False  # torchvision datasets: fetch into `root` when missing
    # Side of the square input; default: the weights' crop size, else the source's natural one.
    image_size: int | None = Field(None, ge=8, le=1024)
    val_fraction: float = Field(0.2, gt=0, lt=0.9)
    test_fraction: float = Field(0.2, gt=0, lt=0.9)
    split_seed: int = 0
    # Use at most this many training examples (after the split): small-data fine-tuning.
    train_limit: int | None = Field(None, ge=10)
    hflip: bool | None = None  # default: on where SOURCES says a flip keeps the label
    # Hold decoded images as tensors (shared by all trials through Ray's object store) or
    # stream them from disk with DataLoader workers; auto: hold them under preload_max_gb.
    preload: Literal["auto", "always", "never"] = "auto"
    preload_max_gb: float = Field(2.0, gt=0)
    workers: int | None = Field(None, ge=0, le=256)  # DataLoader workers (default: trial CPUs)

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v not in SOURCES:
            near = difflib.get_close_matches(v, list(SOURCES), n=1, cutoff=0.5)
            near = near or [k for k in SOURCES if k.lower() == v.lower()]
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ValueError(f"unknown data source {v!r}; allowed: {', '.join(SOURCES)}.{hint}")
        return v

    @model_validator(mode="after")
    def _fractions(self) -> DataSpec:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        if self.source not in BUILTIN_SOURCES and not self.root:
            what = ("a folder of class folders" if self.source == "imagefolder"
                    else f"the folder holding the torchvision {self.source} files")
            raise FieldError(("data", "root"), f"source: {self.source} needs data.root "
                                               f"({what})")
        if (self.val_root or self.test_root) and self.source != "imagefolder":
            raise FieldError(("data", "val_root" if self.val_root else "test_root"),
                             "separate val/test folders are for source: imagefolder only")
        return self

    @property
    def flip(self) -> bool:
        """Whether augmentation may flip images horizontally."""
        return SOURCES[self.source][1] if self.hflip is None else self.hflip


class TrainSpec(Strict):
    max_epochs: int = Field(4, ge=1, le=100000)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class Resources(Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _fraction_or_whole(cls, v: float) -> float:
        if v > 1 and not v.is_integer():
            raise ValueError("gpu above 1 must be a whole number (fractions pack trials on one "
                             "GPU)")
        return v


# The most trials one search may ask for. The driver keeps every trial in memory (Ray Tune's
# table, ~65 kB a trial) and snapshots it: bench/load.py measured 10,000 trials (1.7 GB);
# 100,000 is ~8 GB. More is a search no machine finishes: say so, not launch it.
MAX_SAMPLES = 100_000


class RunSpec(Strict):
    num_samples: int = Field(16, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    resources: Resources = Resources()
    storage_path: str = "./rtft_runs"
    checkpoints_to_keep: int = Field(1, ge=1)
    # When a trial writes a checkpoint (its training state, and the best epoch's weights,
    # kept in memory until then): after its last epoch (max_t), every `checkpoint_every`
    # epochs (0: no epoch rule), and after any epoch that ends `checkpoint_every_minutes`
    # after the last checkpoint. A retried or resumed trial re-trains the epochs since its
    # last checkpoint, with the same results (bench/README.md: "Per-epoch cost").
    checkpoint_every: int = Field(0, ge=0)
    checkpoint_every_minutes: float = Field(10.0, gt=0)
    max_failures: int = Field(0, ge=0)  # retries of one trial, from its last checkpoint
    max_failed_trials: int | None = Field(None, ge=1)  # end the search after this many

    @field_validator("num_samples")
    @classmethod
    def _finishable(cls, v: int) -> int:
        if v > MAX_SAMPLES:
            raise ValueError(f"got {v}: more trials than one search can finish (the driver "
                             f"keeps every trial in memory, ~65 kB each); allowed: "
                             f"1..{MAX_SAMPLES:,}, or several searches chained with "
                             f"searcher.warm_start")
        return v


class PromoteSpec(Strict):
    top_k: int = Field(1, ge=1)
    dir: str = "./models"
    # Cost bounds: the best trial whose measured latency at batch 1 (ms, on the trial's
    # device) and parameter count fit is promoted; none fitting is said, not worked around.
    max_latency_ms: float | None = Field(None, gt=0)
    max_params: int | None = Field(None, gt=0)


class Spec(Strict):
    """A whole search spec. Read one with :func:`raytune_ft.spec.yaml_io.load_spec` (a file) or
    :func:`raytune_ft.spec.yaml_io.parse_spec` (text)."""

    name: str
    metric: Literal["val_acc", "val_loss"] = "val_acc"
    # A factory, not `ModelSpec()`: building the default validates `arch`, which imports
    # torchvision; done at class definition it would make importing this module take seconds.
    model: ModelSpec = Field(default_factory=ModelSpec)
    # validate_default: a spec without `data:` gets its image size resolved too.
    data: DataSpec = Field(DataSpec(), validate_default=True)
    train: TrainSpec = TrainSpec()
    search: dict[str, SearchParam] = Field(default_factory=dict)
    searcher: SearcherSpec = SearcherSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    run: RunSpec = RunSpec()
    promote: PromoteSpec = PromoteSpec()
    # Where the search is also recorded (MLflow; off by default): raytune_ft/spec/track.py.
    track: TrackSpec = TrackSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes a folder under the storage path: it must not escape it.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v) or ".." in v:
            raise ValueError(f"{v!r} is not a valid run name; allowed: 1-100 letters, digits, "
                             f"'.', '_' or '-', starting with a letter or digit, no '..' or '/'")
        return v

    @field_validator("search", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        # `batch_size: 64` is short for `batch_size: {space: fixed, value: 64}`.
        if isinstance(v, dict):
            return {k: p if isinstance(p, dict) else {"space": "fixed", "value": p}
                    for k, p in v.items()}
        return v

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    @property
    def max_t(self) -> int:
        return self.scheduler.max_t or self.train.max_epochs

    @field_validator("data")
    @classmethod
    def _resolve_data(cls, d: DataSpec, info: ValidationInfo) -> DataSpec:
        # Fill in the defaults that depend on other sections once, here, so spec.yaml in the
        # run folder says what was used: the image size from the torchvision weights' crop
        # size, else the source's natural size; the flip from the source. `model` is declared
        # before `data`, so it is validated already (absent when it was refused).
        if d.image_size is not None and d.hflip is not None:
            return d
        model = info.data.get("model")
        if model is not None and isinstance(model.arch, Choice):
            # Each architecture has its own size (Spec.for_arch resolves it): none is written
            # here unless the spec gives one for all.
            return d.model_copy(update={"hflip": d.flip})
        meta = weights_meta(model.arch, model.weights) if model and not model.factory else None
        size = d.image_size or (meta["crop_size"] if meta else SOURCES[d.source][0])
        return d.model_copy(update={"image_size": size, "hflip": d.flip})

    @property
    def archs(self) -> list[str]:
        """The architectures the search trains: one, or the values of `model.arch`'s choice."""
        return self.model.archs

    @property
    def arch_searched(self) -> bool:
        """Whether `model.arch` is a choice (a search parameter named `arch`)."""
        return isinstance(self.model.arch, Choice)

    @property
    def params(self) -> dict[str, SearchParam]:
        """Every search parameter: `arch` first when it is a choice, then `search:`. What
        lists, samples or prints the search's parameters reads this, not `search`."""
        if isinstance(self.model.arch, Choice):
            return {"arch": self.model.arch, **self.search}
        return dict(self.search)

    def for_arch(self, arch: str) -> Spec:
        """This spec for one of its architectures, as if written for it alone: `model.arch`
        and `model.weights` that architecture's, `data.image_size` resolved for it (the value
        written, else its weights' crop size, else the source's size), the search parameters
        whose `when:` excludes it dropped (and those gated by a dropped one), `arch` taken out
        of the other conditions. A single-arch spec returns itself for its own arch."""
        if arch not in self.archs:
            raise UserError(f"{arch!r} is not an architecture of this spec; allowed: "
                            f"{', '.join(self.archs)}", field="model.arch")
        if not self.arch_searched:
            return self
        data = self.model_dump(mode="json", exclude={"search"})
        data["model"].update(arch=arch, weights=self.model.weights_for(arch))
        data["search"] = {n: p.model_dump(mode="json")
                          for n, p in params_for_arch(self.search, arch).items()}
        return Spec.model_validate(data)

    def for_trial(self, params: Mapping[str, Any]) -> Spec:
        """The single-arch spec one trial trains: `for_arch(params["arch"])` when the
        architecture is searched, else this spec."""
        return self.for_arch(str(params["arch"])) if self.arch_searched else self

    @model_validator(mode="after")
    def _cross_checks(self) -> Spec:
        check_params(self.search, self.model.arch if self.arch_searched else None)
        if self.model.teacher is None:
            for knob in ("distill_alpha", "distill_temperature"):
                if knob in self.search:
                    raise FieldError(("search", knob),
                                     f"{knob} only counts with model.teacher, and this spec "
                                     f"names none: the knob would do nothing; allowed: set "
                                     f"model.teacher (a promoted model folder), or drop "
                                     f"search.{knob}")
        if self.scheduler.max_t is not None and self.scheduler.max_t > self.train.max_epochs:
            raise FieldError(("scheduler", "max_t"),
                             f"max_t ({self.scheduler.max_t}) exceeds train.max_epochs "
                             f"({self.train.max_epochs}); allowed: 1..{self.train.max_epochs}")
        check_scheduler(self.scheduler, self.max_t)  # grace_period, brackets
        return self


# --------------------------------------------------------------------------------------------
# Before launch: do the trials fit the cluster?
# --------------------------------------------------------------------------------------------
def check_fit(spec: Spec, cluster: Mapping[str, float], *, where: str = "the cluster") -> int:
    """How many trials of `spec` fit at once on `cluster`, by resources alone.

    `cluster` holds totals keyed like Ray's ``ray.cluster_resources()`` ("CPU", "GPU"); the
    search runs at most ``run.max_concurrent_trials`` of the trials that fit. When not even one
    trial fits, Ray would leave every trial PENDING forever (ray#24259): raises
    :class:`UserError` on `run.resources` naming what a trial asks and what `where` has.
    Totals only: per-node packing (2 GPUs per trial on two 1-GPU nodes) is Ray's to judge.
    """
    res = spec.run.resources
    have = {k: float(cluster.get(k, 0) or 0) for k in ("CPU", "GPU")}
    ask = {"CPU": res.cpu, "GPU": res.gpu}
    eps = 1e-9  # 0.1 + 0.2 GPU must fit in 0.3
    short = [k for k in ask if ask[k] > have[k] + eps]
    if short:
        gpu_hint = (" (it has no GPU: set run.resources.gpu: 0, or run on a GPU cluster with "
                    "--address)" if "GPU" in short and have["GPU"] == 0 else "")
        raise UserError(
            f"each trial asks for {res.cpu:g} CPU and {res.gpu:g} GPU, but {where} has "
            f"{have['CPU']:g} CPU and {have['GPU']:g} GPU{gpu_hint}; Ray would leave every "
            f"trial pending forever; allowed: cpu <= {have['CPU']:g}, gpu <= {have['GPU']:g}",
            field="run.resources")
    return int(min(math.floor(have[k] / ask[k] + eps) for k in ask if ask[k] > 0))
