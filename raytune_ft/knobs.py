"""What a trial is trained with and how the search varies it: :class:`Hyperparams` (every knob
the trainer implements, with the defaults of a plain fine-tune) and the `search:` parameters
(`space: loguniform | uniform | int | choice | fixed`, optionally gated by `when:`).

The spec schema (:mod:`raytune_ft.spec.schema`) builds on this module; the trainer, the model
builder and the Optuna space (:mod:`raytune_ft.space`) read it. It imports pydantic and the standard
library only: nothing of ours, never torch.
"""

from __future__ import annotations

import difflib
import graphlib
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ACTIVATIONS", "INITS", "SPACES", "SPACE_MODELS",
    "Choice", "FieldError", "Fixed", "Hyperparams", "IntRange", "LogUniform", "Scalar",
    "SearchParam", "Strict", "Uniform", "allowed", "arch_param", "check_params", "param_order",
    "params_for_arch",
]


class Strict(BaseModel):
    """The base of every spec model: unknown keys refused, instances frozen."""

    # No inf/NaN anywhere: `gpu: .inf` or `lr: {low: .nan}` is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FieldError(ValueError):
    """Raised inside validators to point at a field other than the one being validated
    (:mod:`raytune_ft.spec.yaml_io` turns it into a :class:`~raytune_ft.errors.UserError` there)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        self.loc = loc
        self.message = message
        super().__init__(message)


# --------------------------------------------------------------------------------------------
# The knobs one trial is trained with. `search:` may vary any of these; the rest keep defaults.
# --------------------------------------------------------------------------------------------
class Hyperparams(Strict):
    """Every fine-tuning choice the trainer implements, with the defaults of a plain fine-tune."""

    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    batch_size: int = Field(64, ge=1, le=65536)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Focal loss (Lin et al. 2017) down-weights examples the model already gets right by
    # (1 - p)^focal_gamma; gamma 0 is cross-entropy. focal_gamma only counts with loss: focal.
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: float = Field(2.0, ge=0, le=10)
    head_dropout: float = Field(0.0, ge=0, lt=1)
    head_hidden: int = Field(0, ge=0, le=65536)
    activation: Literal["relu", "gelu", "silu", "leaky_relu", "elu", "mish", "tanh",
                        "sigmoid"] = "relu"
    activation_scope: Literal["head", "all"] = "head"
    init: Literal[
        "default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
        "orthogonal", "trunc_normal",
    ] = "default"
    reinit_blocks: int = Field(0, ge=0, le=64)
    freeze_depth: int = Field(0, ge=0, le=64)
    # The same as a share of the network's stages, so one range means the same in every
    # family (resnet18 has 5 stages, mobilenet_v3_small 13): the trainer freezes
    # max(freeze_depth, round(freeze_fraction * stages)) of them (models.frozen_stages).
    freeze_fraction: float = Field(0.0, ge=0, le=1)
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
    # Knowledge distillation from `model.teacher` (Hinton et al. 2015): the loss is
    # (1 - alpha) * task loss + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).
    # Both only count when the spec names a teacher; alpha 0 is the plain loss, bit for bit.
    distill_alpha: float = Field(0.5, ge=0, le=1)
    distill_temperature: float = Field(4.0, gt=0, le=100)
    # BatchNorm momentum (PyTorch's: the weight of each new batch in the running statistics);
    # None keeps the architecture's own. mobilenet_v3 and efficientnet use 0.01: after a few
    # hundred steps from scratch their running statistics are still far from the data's, and
    # evaluation (which uses them) stays at chance while training accuracy climbs.
    bn_momentum: float | None = Field(None, gt=0, le=1)


# Read off the knobs' own Literals, so the names are written once.
ACTIVATIONS: tuple[str, ...] = get_args(Hyperparams.model_fields["activation"].annotation)
INITS: tuple[str, ...] = get_args(Hyperparams.model_fields["init"].annotation)
_INT_KNOBS = {n for n, f in Hyperparams.model_fields.items() if f.annotation is int}


# --------------------------------------------------------------------------------------------
# Search parameters, tagged by `space:` (Ludwig-style).
# --------------------------------------------------------------------------------------------
Scalar = Union[bool, int, float, str, None]


class _Param(Strict):
    # `when: {optimizer: sgd}` or `when: {optimizer: [sgd, adam]}`: sampled only then.
    when: dict[str, Union[Scalar, list[Scalar]]] | None = None

    def candidates(self) -> dict[str, Any]:
        """The values of this parameter that must be valid knob values, keyed by field."""
        raise NotImplementedError


class _Range(_Param):
    """An interval [low, high]: its two ends are what must be valid knob values."""

    if TYPE_CHECKING:  # declared by each subclass (its own type, and its place in the dump)
        low: float
        high: float
    # A float range must have width (one value is `space: fixed`); an int range may hold one.
    _single_ok: ClassVar[bool] = False

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if self.low > self.high or (self.low == self.high and not self._single_ok):
            relation = "must not exceed" if self._single_ok else "must be below"
            raise ValueError(f"low ({self.low}) {relation} high ({self.high})")
        return self

    def candidates(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}


class _FloatRange(_Range):
    low: float
    high: float


class LogUniform(_FloatRange):
    space: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class Uniform(_FloatRange):
    space: Literal["uniform"]


class IntRange(_Range):
    space: Literal["int"]
    low: int
    high: int
    log: bool = False
    _single_ok: ClassVar[bool] = True

    @model_validator(mode="after")
    def _log_from_one(self) -> IntRange:
        if self.log and self.low < 1:
            raise ValueError("log: true needs low >= 1")
        return self


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
SPACE_MODELS: dict[str, type[_Param]] = {
    "loguniform": LogUniform, "uniform": Uniform, "int": IntRange, "choice": Choice,
    "fixed": Fixed}


def allowed(err: dict) -> str:
    """`allowed: …` for one pydantic error (a dict of ``ValidationError.errors()``). Here, not
    in spec_io, because the search-space check below words its errors the same way."""
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


def check_params(search: dict[str, Any], arch: Choice | None = None) -> None:
    """Check a parsed `search:` block against the knobs: known names, spaces that suit each
    knob's type, every candidate value a valid knob value, and `when:` conditions that name a
    choice/fixed parameter's values without forming a cycle. `arch`: `model.arch` when it is
    a choice, which conditions may then name as `arch`. Raises :class:`FieldError`."""
    knobs = list(Hyperparams.model_fields)
    for name, param in search.items():
        if name not in knobs:
            near = difflib.get_close_matches(name, knobs, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise FieldError(("search", name),
                             f"unknown parameter; allowed: {', '.join(knobs)}.{hint}")
        if name in _INT_KNOBS and param.space in ("uniform", "loguniform"):
            raise FieldError(("search", name, "space"),
                             f"'{name}' is a whole number; use space: int, choice or fixed")
        for key, value in param.candidates().items():
            try:
                Hyperparams.model_validate({name: value})
            except ValidationError as e:
                err = e.errors()[0]
                raise FieldError(("search", name, *key.split(".")),
                                 f"{value!r} is not a valid {name}: {allowed(err)}") from e
    parents: dict[str, Any] = {**({"arch": arch} if arch is not None else {}), **search}
    deps: dict[str, set[str]] = {}
    for name, param in search.items():
        deps[name] = set()
        for parent, wanted in (param.when or {}).items():
            loc = ("search", name, "when", parent)
            if parent == "arch" and arch is None:
                raise FieldError(loc, "a condition on 'arch' needs model.arch to be a choice "
                                      "({space: choice, values: [...]}); allowed: conditions "
                                      "on search parameters")
            if parent not in parents:
                raise FieldError(loc, f"condition names '{parent}', which is not a search "
                                      f"parameter; allowed: {', '.join(sorted(parents))}")
            pp = parents[parent]
            options = pp.values if pp.space == "choice" else [pp.value] if pp.space == "fixed" \
                else None
            if options is None:
                raise FieldError(loc, f"conditions need a choice or fixed parameter, and "
                                      f"'{parent}' is {pp.space}")
            for w in wanted if isinstance(wanted, list) else [wanted]:
                if w not in options:
                    raise FieldError(loc, f"{w!r} is never a value of '{parent}'; allowed: "
                                          f"{', '.join(map(repr, options))}")
            deps[name].add(parent)
    try:
        tuple(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as e:
        raise FieldError(("search", e.args[1][0], "when"),
                         f"conditions form a cycle: {' -> '.join(e.args[1])}") from e


def param_order(search: dict[str, Any]) -> list[str]:
    """Parameter names with every condition's parent before the parameters it gates (a
    parent that is not among them, such as `arch` beside `spec.search`, is left out)."""
    deps = {n: {k for k in (p.when or {}) if k in search} for n, p in search.items()}
    order = list(graphlib.TopologicalSorter(deps).static_order())
    # Keep the spec's order where conditions allow: stable for humans and for seeds.
    return sorted(order, key=lambda n: (order.index(n) if deps[n] else -1, list(search).index(n)))


# --------------------------------------------------------------------------------------------
# `model.arch` as a search parameter: `{space: choice, values: [...]}`, named `arch`.
# --------------------------------------------------------------------------------------------
def arch_param(v: Any) -> Any:
    """A `model.arch` value as written, parsed: a name passes through (whether torchvision has
    it is the spec's check), a choice becomes a :class:`Choice` of distinct names without a
    `when:`. Raises :class:`FieldError`."""
    if isinstance(v, (str, Choice)):
        return v
    if not isinstance(v, dict) or v.get("space") != "choice":
        raise FieldError(("model", "arch"),
                         f"got {v!r}; allowed: an architecture name such as resnet18, or "
                         f"{{space: choice, values: [resnet18, mobilenet_v3_small]}}")
    try:
        choice = Choice.model_validate(v)
    except ValidationError as e:
        # Parsed here rather than by a union, so an error names `model.arch.values.1`, not
        # pydantic's union members.
        # A misspelt key also makes its real name "missing": name the misspelling first.
        err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
        msg = allowed(err)
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(err["loc"][-1]), ["space", "values"], n=1)
            msg = "unknown key; allowed: space, values." + (f" Did you mean '{near[0]}'?"
                                                             if near else "")
        raise FieldError(("model", "arch", *err["loc"]), msg) from e
    if choice.when is not None:
        raise FieldError(("model", "arch", "when"),
                         "the architecture is sampled first, unconditionally; allowed: `when:` "
                         "on the search parameters (when: {arch: [...]})")
    for i, a in enumerate(choice.values):
        if not isinstance(a, str):
            raise FieldError(("model", "arch", "values", i),
                             f"got {a!r}; allowed: a torchvision architecture name")
        if a in choice.values[:i]:
            raise FieldError(("model", "arch", "values", i),
                             f"{a!r} is listed twice; allowed: each architecture once")
    return choice


def params_for_arch(search: dict[str, Any], arch: str) -> dict[str, Any]:
    """The `search:` parameters that can apply when the architecture is `arch`, in the same
    order: those whose `when:` excludes `arch` are dropped, and so are those gated by a dropped
    one (they could never be sampled); `arch` is taken out of the others' conditions."""
    kept: dict[str, Any] = {}
    for name in param_order(search):
        p = search[name]
        when = dict(p.when or {})
        wanted = when.pop("arch", arch)
        if arch not in (wanted if isinstance(wanted, list) else [wanted]):
            continue
        if any(parent not in kept for parent in when):  # its parent never applies
            continue
        kept[name] = p.model_copy(update={"when": when or None})
    return {n: kept[n] for n in search if n in kept}
