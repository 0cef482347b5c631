"""The search spec: one YAML file, validated by pydantic, rejected with file, field and line.

This module imports nothing else of ours. Every other module takes a :class:`Spec` (or the
:class:`Hyperparams` of one trial) and may trust it.
"""

from __future__ import annotations

import difflib
import graphlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "SOURCES",
    "Hyperparams",
    "Spec",
    "SpecError",
    "apply_overrides",
    "check_fit",
    "load_spec",
    "parse_spec",
    "redact",
    "spec_to_yaml",
    "weights_meta",
]

ACTIVATIONS = ("relu", "gelu", "silu", "leaky_relu", "elu", "mish", "tanh")
INITS = (
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
    "trunc_normal",
)
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


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SpecError(ValueError):
    """A spec the tool refuses: one paragraph naming the file, the field and the YAML line."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.field = field
        self.line = line
        super().__init__(str(self))

    def located(self, file: str | Path) -> SpecError:
        """This error attributed to spec `file`, with the YAML line of its field if known."""
        if self.file is None:
            self.file = str(file)
            if self.field and self.line is None:
                try:
                    lines = _line_map(yaml.compose(Path(file).read_text(), Loader=yaml.SafeLoader))
                    self.line = lines.get(tuple(self.field.split(".")))
                except (OSError, yaml.YAMLError, UnicodeDecodeError):
                    pass
        return self

    def __str__(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where += f", line {self.line}"
        field = f" field '{self.field}':" if self.field else ""
        # One paragraph whatever the spec holds: a key or value with a newline or another
        # control character is shown escaped (as Python writes it), never as a line break.
        return _CONTROL.sub(lambda m: repr(m.group())[1:-1], f"{where}:{field} {self.message}")


class _Strict(BaseModel):
    # No inf/NaN anywhere: `gpu: .inf` or `lr: {low: .nan}` is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# The knobs one trial is trained with. `search:` may vary any of these; the rest keep defaults.
# --------------------------------------------------------------------------------------------
class Hyperparams(_Strict):
    """Every fine-tuning choice the trainer implements, with the defaults of a plain fine-tune."""

    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    batch_size: int = Field(64, ge=1, le=65536)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    head_dropout: float = Field(0.0, ge=0, lt=1)
    head_hidden: int = Field(0, ge=0, le=65536)
    activation: Literal["relu", "gelu", "silu", "leaky_relu", "elu", "mish", "tanh"] = "relu"
    activation_scope: Literal["head", "all"] = "head"
    init: Literal[
        "default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
        "orthogonal", "trunc_normal",
    ] = "default"
    reinit_blocks: int = Field(0, ge=0, le=64)
    freeze_depth: int = Field(0, ge=0, le=64)
    # Epoch (1-based) from which the whole backbone trains; 0 keeps frozen stages frozen.
    unfreeze_at_epoch: int = Field(0, ge=0, le=10000)
    backbone_lr_mult: float = Field(1.0, gt=0, le=100)
    warmup_epochs: float = Field(0.0, ge=0, le=10000)
    # timm-style layer-wise LR decay: stage i of S (from the input) trains at
    # lr * layer_decay ** (S - i); 1 turns it off. Multiplies with backbone_lr_mult.
    layer_decay: float = Field(1.0, gt=0, le=1)
    augment: Literal["none", "light", "strong"] = "light"
    # Mixup / CutMix Beta(alpha, alpha); 0 turns each off (both on: one of them per batch).
    mixup_alpha: float = Field(0.0, ge=0, le=10)
    cutmix_alpha: float = Field(0.0, ge=0, le=10)
    grad_clip: float = Field(0.0, ge=0)


_INT_KNOBS = {n for n, f in Hyperparams.model_fields.items() if f.annotation is int}


# --------------------------------------------------------------------------------------------
# Search parameters, tagged by `space:` (Ludwig-style).
# --------------------------------------------------------------------------------------------
Scalar = Union[bool, int, float, str, None]


class _Param(_Strict):
    # `when: {optimizer: sgd}` or `when: {optimizer: [sgd, adam]}`: sampled only then.
    when: dict[str, Union[Scalar, list[Scalar]]] | None = None

    def candidates(self) -> dict[str, Any]:
        """The values of this parameter that must be valid knob values, keyed by field."""
        raise NotImplementedError


class _FloatRange(_Param):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> _FloatRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    def candidates(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}


class LogUniform(_FloatRange):
    space: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class Uniform(_FloatRange):
    space: Literal["uniform"]


class IntRange(_Param):
    space: Literal["int"]
    low: int
    high: int
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low < 1:
            raise ValueError("log: true needs low >= 1")
        return self

    def candidates(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}


class Choice(_Param):
    space: Literal["choice"]
    values: list[Scalar] = Field(min_length=1)

    def candidates(self) -> dict[str, Any]:
        return {f"values.{i}": v for i, v in enumerate(self.values)}


class Fixed(_Param):
    space: Literal["fixed"]
    value: Scalar

    def candidates(self) -> dict[str, Any]:
        return {"value": self.value}


SearchParam = Annotated[
    Union[LogUniform, Uniform, IntRange, Choice, Fixed], Field(discriminator="space")
]
SPACES = ("loguniform", "uniform", "int", "choice", "fixed")
_SPACE_MODELS = {"loguniform": LogUniform, "uniform": Uniform, "int": IntRange, "choice": Choice,
                 "fixed": Fixed}


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
class ModelSpec(_Strict):
    arch: str = "resnet18"
    # torchvision weights name (DEFAULT, IMAGENET1K_V1), a local .pth/.safetensors file or
    # promoted model folder, `rtft:mnist` (a backbone rtft pretrains itself, offline), or none.
    weights: str = "none"
    # A model from outside torchvision: "package.module:function", called with this `model:`
    # section as a dict; `arch` is then only a label (see models.py, "factory protocol").
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # free-form, for the factory

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"{v!r} is not 'package.module:function'; allowed: an importable "
                             f"module path, a colon, and a function name")
        return v

    @model_validator(mode="after")
    def _known_arch(self) -> ModelSpec:
        if self.factory is not None:
            return self
        import torchvision.models  # local import: only validation needs the registry

        known = torchvision.models.list_models(module=torchvision.models)
        if self.arch not in known:
            near = difflib.get_close_matches(self.arch, known, n=3)
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise _FieldError(
                ("model", "arch"),
                f"unknown architecture {self.arch!r}; allowed: a torchvision classification "
                f"model name such as resnet18, resnet50, efficientnet_b0, convnext_tiny, "
                f"vit_b_16, or model.factory for other models.{hint}")
        return self


def weights_meta(arch: str, weights: str) -> dict[str, Any] | None:
    """The torchvision metadata (crop size, resize size, mean, std) of a weights name, or None
    when `weights` is not one (a file, `rtft:`, `none`). Nothing is downloaded."""
    if weights in ("none", "") or weights.startswith("rtft:") or any(c in weights for c in "/\\."):
        return None
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(arch)
        w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (KeyError, ValueError):
        return None
    t = w.transforms()
    return {"crop_size": int(t.crop_size[0]), "resize_size": int(t.resize_size[0]),
            "mean": tuple(t.mean), "std": tuple(t.std), "name": f"{arch}.{w.name}"}


class DataSpec(_Strict):
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
            raise _FieldError(("data", "root"), f"source: {self.source} needs data.root "
                                                f"({what})")
        if (self.val_root or self.test_root) and self.source != "imagefolder":
            raise _FieldError(("data", "val_root" if self.val_root else "test_root"),
                              "separate val/test folders are for source: imagefolder only")
        return self

    @property
    def flip(self) -> bool:
        """Whether augmentation may flip images horizontally."""
        return SOURCES[self.source][1] if self.hflip is None else self.hflip


class TrainSpec(_Strict):
    max_epochs: int = Field(4, ge=1, le=100000)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class SearcherSpec(_Strict):
    sampler: Literal["tpe", "random", "cmaes", "gp", "qmc"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(5, ge=0)
    # Try the plain defaults first (where the space allows them): the search then never ends
    # below a default fine-tune on the validation metric.
    baseline_first: bool = True


class SchedulerSpec(_Strict):
    type: Literal["asha", "none"] = "asha"
    max_t: int | None = Field(None, ge=1)  # default: train.max_epochs
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, ge=2)


class Resources(_Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _fraction_or_whole(cls, v: float) -> float:
        if v > 1 and not v.is_integer():
            raise ValueError("gpu above 1 must be a whole number (fractions pack trials on one "
                             "GPU)")
        return v


class RunSpec(_Strict):
    num_samples: int = Field(16, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    resources: Resources = Resources()
    storage_path: str = "./rtft_runs"
    checkpoints_to_keep: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=0)  # retries of one trial, from its last checkpoint
    max_failed_trials: int | None = Field(None, ge=1)  # end the search after this many


class PromoteSpec(_Strict):
    top_k: int = Field(1, ge=1)
    dir: str = "./models"


class Spec(_Strict):
    """A whole search spec. Build it with :func:`load_spec` or :func:`parse_spec`."""

    name: str
    metric: Literal["val_acc", "val_loss"] = "val_acc"
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    search: dict[str, SearchParam] = Field(default_factory=dict)
    searcher: SearcherSpec = SearcherSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    run: RunSpec = RunSpec()
    promote: PromoteSpec = PromoteSpec()

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

    @model_validator(mode="after")
    def _cross_checks(self) -> Spec:
        _check_params(self.search)
        d = self.data
        if d.image_size is None or d.hflip is None:
            # Resolve the defaults once, so spec.yaml in the run folder says what was used.
            meta = weights_meta(self.model.arch, self.model.weights) if not self.model.factory \
                else None
            size = d.image_size or (meta["crop_size"] if meta else SOURCES[d.source][0])
            object.__setattr__(self, "data", d.model_copy(
                update={"image_size": size, "hflip": d.flip}))
        if self.scheduler.max_t is not None and self.scheduler.max_t > self.train.max_epochs:
            raise _FieldError(("scheduler", "max_t"),
                              f"max_t ({self.scheduler.max_t}) exceeds train.max_epochs "
                              f"({self.train.max_epochs}); allowed: 1..{self.train.max_epochs}")
        if self.scheduler.type == "asha" and self.scheduler.grace_period > self.max_t:
            raise _FieldError(("scheduler", "grace_period"),
                              f"grace_period ({self.scheduler.grace_period}) exceeds max_t "
                              f"({self.max_t}); allowed: 1..{self.max_t}")
        return self


class _FieldError(ValueError):
    """Raised inside validators to point at a field other than the one being validated."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        self.loc = loc
        self.message = message
        super().__init__(message)


def _check_params(search: dict[str, Any]) -> None:
    knobs = list(Hyperparams.model_fields)
    for name, param in search.items():
        if name not in knobs:
            near = difflib.get_close_matches(name, knobs, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise _FieldError(("search", name),
                              f"unknown parameter; allowed: {', '.join(knobs)}.{hint}")
        if name in _INT_KNOBS and param.space in ("uniform", "loguniform"):
            raise _FieldError(("search", name, "space"),
                              f"'{name}' is a whole number; use space: int, choice or fixed")
        for key, value in param.candidates().items():
            try:
                Hyperparams.model_validate({name: value})
            except ValidationError as e:
                err = e.errors()[0]
                raise _FieldError(("search", name, *key.split(".")),
                                  f"{value!r} is not a valid {name}: {_allowed(err)}") from None
    deps: dict[str, set[str]] = {}
    for name, param in search.items():
        deps[name] = set()
        for parent, wanted in (param.when or {}).items():
            loc = ("search", name, "when", parent)
            if parent not in search:
                raise _FieldError(loc, f"condition names '{parent}', which is not a search "
                                       f"parameter; allowed: {', '.join(sorted(search))}")
            pp = search[parent]
            options = pp.values if pp.space == "choice" else [pp.value] if pp.space == "fixed" \
                else None
            if options is None:
                raise _FieldError(loc, f"conditions need a choice or fixed parameter, and "
                                       f"'{parent}' is {pp.space}")
            for w in wanted if isinstance(wanted, list) else [wanted]:
                if w not in options:
                    raise _FieldError(loc, f"{w!r} is never a value of '{parent}'; allowed: "
                                           f"{', '.join(map(repr, options))}")
            deps[name].add(parent)
    try:
        tuple(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as e:
        raise _FieldError(("search", e.args[1][0], "when"),
                          f"conditions form a cycle: {' -> '.join(e.args[1])}") from None


def param_order(search: dict[str, Any]) -> list[str]:
    """Parameter names with every condition's parent before the parameters it gates."""
    deps = {n: set((p.when or {}).keys()) for n, p in search.items()}
    order = list(graphlib.TopologicalSorter(deps).static_order())
    # Keep the spec's order where conditions allow: stable for humans and for seeds.
    return sorted(order, key=lambda n: (order.index(n) if deps[n] else -1, list(search).index(n)))


# --------------------------------------------------------------------------------------------
# Loading: YAML → lines map → overrides → pydantic → SpecError with file/field/line.
# --------------------------------------------------------------------------------------------
_MERGE_TAG = "tag:yaml.org,2002:merge"
# A spec is a few hundred values. YAML aliases can make a short file expand to billions
# ("billion laughs"); anything past this many values (counted with aliases expanded) or this
# deep is refused before it is built.
_MAX_VALUES = 100_000
_MAX_DEPTH = 50


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one, and keys that
    are not plain scalars (a `? [a, b]` key cannot name a field)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base`: merged keys may be overridden
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain word, not a list or mapping",
                    key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _check_size(node: yaml.Node | None) -> None:
    """Refuse a document that expands (aliases included) past _MAX_VALUES or _MAX_DEPTH."""
    sizes: dict[int, int] = {}  # per node, memoised: an alias costs one lookup, not a walk

    def size(n: yaml.Node, depth: int) -> int:
        if depth > _MAX_DEPTH:
            raise yaml.MarkedYAMLError(problem=f"nested deeper than {_MAX_DEPTH} levels; "
                                               f"a spec is a few levels deep",
                                       problem_mark=n.start_mark)
        if id(n) not in sizes:
            kids = ([c for kv in n.value for c in kv] if isinstance(n, yaml.MappingNode) else
                    n.value if isinstance(n, yaml.SequenceNode) else [])
            sizes[id(n)] = 1 + sum(size(c, depth + 1) for c in kids)
            if sizes[id(n)] > _MAX_VALUES:
                raise yaml.MarkedYAMLError(problem=f"more than {_MAX_VALUES:,} values once "
                                                   f"aliases are expanded",
                                           problem_mark=n.start_mark)
        return sizes[id(n)]

    if node is not None:
        size(node, 0)


def _line_map(node: yaml.Node | None, path: tuple = (), out: dict | None = None,
              seen: set[int] | None = None) -> dict:
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias: its lines were mapped where it was defined
        return out
    seen.add(id(node))
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                continue  # refused by the loader; no path to map
            key = k.value
            _line_map(v, (*path, key), out, seen)
            out[(*path, key)] = k.start_mark.line + 1  # a field's line is its key's line
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, (*path, i), out, seen)
    return out


def _read_yaml(text: str, file: str) -> tuple[dict, dict]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # parsed once: nodes with lines
        _check_size(node)  # before anything is built from it
        loader = _StrictLoader("")
        try:
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
        lines = _line_map(node)
    except RecursionError:
        raise SpecError(f"YAML error: nested deeper than {_MAX_DEPTH} levels; a spec is a few "
                        f"levels deep", file=file) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        if "\\t" in problem or "\t" in problem:
            problem += " (YAML indents with spaces, never tabs)"
        if "could not determine a constructor" in problem:
            problem = (f"{problem.split(' for the tag')[0]} for the tag in this spec: only "
                       f"plain YAML is read (no !!python or other tags)")
        raise SpecError(f"YAML error: {problem}", file=file,
                        line=mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as e:  # a control character: binary, not a text file
        char = f"0x{e.character:02x}" if isinstance(e.character, int) else repr(e.character)
        raise SpecError(f"YAML error: {e.reason} (character {char} at offset {e.position}); "
                        f"a spec is plain text", file=file,
                        line=text[: e.position].count("\n") + 1) from None
    except yaml.YAMLError as e:
        raise SpecError(f"YAML error: {' '.join(str(e).split())}", file=file) from None
    if data is None:
        raise SpecError("the spec is empty; it needs at least 'name:' (see "
                        "search_spaces/resnet.yaml)", file=file)
    if not isinstance(data, dict):
        raise SpecError(f"the spec must be a mapping of sections, not a "
                        f"{type(data).__name__}", file=file, line=lines.get((), 1))
    return data, lines


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> set[tuple]:
    """Apply `key.sub=value` overrides in place (values parsed as YAML scalars/lists).

    Returns the set of paths overridden, so errors on them can say `--set` not a line.
    """
    done = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected key=value, e.g. run.num_samples=4",
                            file="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                section = ".".join(parts[: i + 1])
                raise SpecError(f"--set {item!r}: '{section}' is not a section",
                                file="--set", field=key)
            node = nxt
        node[parts[-1]] = value
        done.add(tuple(parts))
    return done


def _allowed(err: dict) -> str:
    t, ctx, msg = err["type"], err.get("ctx") or {}, err["msg"]
    if t == "literal_error":
        return f"allowed: {ctx.get('expected')}"
    if t == "union_tag_invalid":
        return f"unknown space; allowed: {', '.join(SPACES)}"
    if t == "union_tag_not_found":
        return f"missing 'space:'; allowed: {', '.join(SPACES)}"
    if t == "missing":
        return "this field is required"
    if t.startswith("greater_than") or t.startswith("less_than"):
        return msg.lower()
    return msg[0].lower() + msg[1:] if msg else t


def _error_from_validation(e: ValidationError, file: str, lines: dict, overridden: set,
                           data: dict) -> SpecError:
    # A misspelt key also makes its real name "missing": name the misspelling first.
    errs = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
    err = errs[0]
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, _FieldError):
        loc, message = exc.loc, exc.message
    else:
        loc = tuple(err["loc"])
        # Drop the discriminator tag pydantic puts into the location of tagged unions.
        if loc[:1] == ("search",) and len(loc) > 2 and loc[2] in SPACES:
            loc = loc[:2] + loc[3:]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "space")
        loc, in_union = _drop_union_labels(loc)
        message = (f"got {_short(_get(data, loc))}; allowed: a plain value (text, number, "
                   f"true/false or null)" if in_union else _message(err, loc, data))
    loc = tuple(loc)
    field = ".".join(str(p) for p in loc) or None
    line = None
    if any(loc[: len(o)] == o for o in overridden):
        file = f"{file} (with --set)"
    else:
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
    # One problem per place: a value no member of a union accepts is one problem, not four.
    places = {_drop_union_labels(tuple(x["loc"]))[0] for x in errs}
    more = f" ({len(places) - 1} more problem(s) after this one.)" if len(places) > 1 else ""
    return SpecError(message + more, file=file, field=field, line=line)


_UNION_LABEL = re.compile(r"bool|int|float|str|none|(list|nullable|union)\[.*\]")


def _drop_union_labels(loc: tuple) -> tuple[tuple, bool]:
    """`search.x.values.0.bool` → `search.x.values.0`: pydantic names the member of a union
    of plain values (bool, int, …) it tried; that is no part of the user's field path."""
    head, tail = loc[:3], [p for p in loc[3:]
                           if not (isinstance(p, str) and _UNION_LABEL.fullmatch(p))]
    return (*head, *tail), len(tail) < len(loc[3:])


def _message(err: dict, loc: tuple, data: dict) -> str:
    if err["type"] == "extra_forbidden":
        parent = _SECTION_MODELS.get(loc[:-1])
        if loc[:1] == ("search",) and len(loc) == 3:
            parent = _SPACE_MODELS.get(_get(data, (*loc[:2], "space")))
        allowed = list(parent.model_fields) if parent else []
        near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        return f"unknown key; allowed: {', '.join(allowed)}.{hint}"
    if err["type"] == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return msg
    value = _get(data, loc)
    got = f"got {_short(value)}; " if value is not _MISSING else ""
    return got + _allowed(err)


def _short(value: Any) -> str:
    """repr() of a value from the spec, cut short: an error stays one readable paragraph."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 60, 60
    return r.repr(value)


_MISSING = object()


def _get(data: Any, loc: tuple) -> Any:
    for p in loc:
        in_dict = isinstance(data, dict) and p in data
        in_list = isinstance(data, list) and isinstance(p, int) and p < len(data)
        if in_dict or in_list:
            data = data[p]
        else:
            return _MISSING
    return data


_SECTION_MODELS: dict[tuple, type[BaseModel]] = {
    (): Spec, ("model",): ModelSpec, ("data",): DataSpec, ("train",): TrainSpec,
    ("searcher",): SearcherSpec, ("scheduler",): SchedulerSpec, ("run",): RunSpec,
    ("run", "resources"): Resources, ("promote",): PromoteSpec,
}


def parse_spec(text: str, *, file: str = "<spec>", overrides: list[str] | tuple = ()) -> Spec:
    """Validate spec text (plus `--set` overrides); raise :class:`SpecError` when it is bad."""
    data, lines = _read_yaml(text, file)
    overridden = apply_overrides(data, overrides)
    for path in overridden:  # an overridden field has no YAML line to blame
        lines.pop(path, None)
    # Unknown search-parameter keys: name the allowed keys for that space.
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise _error_from_validation(e, file, lines, overridden, data) from None


def load_spec(path: str | Path, overrides: list[str] | tuple = ()) -> Spec:
    """Read and validate a spec file; errors are :class:`SpecError` naming file/field/line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError("file not found", file=str(path)) from None
    except OSError as e:
        raise SpecError(f"cannot read the file: {e.strerror}", file=str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SpecError(f"the file is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}); save it as UTF-8", file=str(path), line=line) from None
    return parse_spec(text, file=str(path), overrides=overrides)


def spec_to_yaml(spec: Spec) -> str:
    """The resolved spec as YAML: every default spelled out, loadable by :func:`parse_spec`."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)



# --------------------------------------------------------------------------------------------
# Before launch: do the trials fit the cluster? Secrets kept out of saved files and logs.
# --------------------------------------------------------------------------------------------
def check_fit(spec: Spec, cluster: Mapping[str, float], *, where: str = "the cluster") -> int:
    """How many trials of `spec` fit at once on `cluster`, by resources alone.

    `cluster` holds totals keyed like Ray's ``ray.cluster_resources()`` ("CPU", "GPU"); the
    search runs at most ``run.max_concurrent_trials`` of the trials that fit. When not even one
    trial fits, Ray would leave every trial PENDING forever (ray#24259): raises
    :class:`SpecError` on `run.resources` naming what a trial asks and what `where` has.
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
        raise SpecError(
            f"each trial asks for {res.cpu:g} CPU and {res.gpu:g} GPU, but {where} has "
            f"{have['CPU']:g} CPU and {have['GPU']:g} GPU{gpu_hint}; Ray would leave every "
            f"trial pending forever; allowed: cpu <= {have['CPU']:g}, gpu <= {have['GPU']:g}",
            field="run.resources")
    return int(min(math.floor(have[k] / ask[k] + eps) for k in ask if ask[k] > 0))


# Environment variable names whose values are secrets (matched anywhere in the name, any case).
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|^AWS_|^RAY_AUTH",
                          re.IGNORECASE)


def redact(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `mapping` whose secret-looking keys (TOKEN, KEY, SECRET, PASSWORD, AWS_*,
    RAY_AUTH*, …) have their values replaced by "***", in nested mappings and lists too.

    For everything written or printed that may hold environment variables (a runtime_env's
    `env_vars`, a submitted job's settings): the names stay visible, the values never do.
    """
    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return redact(value)
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return {k: "***" if isinstance(k, str) and _SECRET_NAME.search(k) else clean(v)
            for k, v in mapping.items()}
