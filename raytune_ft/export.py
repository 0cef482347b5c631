"""Export a promoted model folder to ONNX or TorchScript, checked before it is kept.

The network is rebuilt as :func:`raytune_ft.promote.load_promoted` rebuilds it (weights'
sha256 checked), exported to a temporary file beside the destination, and that file, read
back by its own runtime (onnxruntime, ``torch.jit.load``), is run on the held-out test split
the model was scored on (normalised as the trainer does). Only when its top-1 class agrees
with PyTorch's on every image is it renamed into place, atomically; otherwise it is deleted
and a :class:`~raytune_ft.errors.UserError` says what differed.

The file carries what a user needs to feed it: classes, input size, mean/std and the sha256
of the weights it came from (ONNX ``metadata_props``; TorchScript ``_extra_files``).
The exported graph takes float32 (N, 3, H, W) images scaled to [0, 1] and normalised with
mean/std, and returns logits (N, classes); N is free.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raytune_ft.checkpoint import honour_umask
from raytune_ft.data import iter_batches, normalize, prepare
from raytune_ft.errors import UserError, first_line
from raytune_ft.promote import PromotedModelError, load_promoted
from raytune_ft.spec.schema import DataSpec

__all__ = ["FORMATS", "ExportResult", "export_model", "read_metadata", "write_export"]

FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
# Keys of the metadata whose values are JSON (lists); the others are plain strings. ONNX
# metadata_props are string -> string, so lists travel as JSON text.
_JSON_KEYS = ("classes", "input_size", "mean", "std")
_TS_META = "rtft.json"  # the TorchScript archive's extra file holding the metadata
_BATCH = 64


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how closely the file matches PyTorch."""

    path: Path
    format: str
    exporter: str          # how the file was made, e.g. "torch.onnx (dynamo), opset 18"
    size_bytes: int
    max_abs_diff: float    # over every logit of every checked image
    agreement: float       # fraction of images whose top-1 class matches PyTorch's: 1.0
    n_images: int
    split: str             # the split the images came from: "test" (or "val" if none)
    data_matches: bool     # the split's fingerprint is the one promotion recorded


def export_model(model_dir: str | Path, fmt: str, out: str | Path | None = None, *,
                 max_images: int | None = None) -> ExportResult:
    """Export the promoted model in `model_dir` to `out` (default `model_dir/model.onnx` or
    `model.torchscript.pt`), checked on the held-out test split. Raises UserError when the
    folder is not a promoted model, the network cannot be exported (naming the operator), or
    the exported file's top-1 class differs from PyTorch's on any checked image; then no file
    is left behind."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    src = Path(model_dir)
    try:
        promoted = load_promoted(src)
    except PromotedModelError as e:
        raise UserError(str(e)) from e
    model, config, metrics = promoted.model, promoted.config, promoted.metrics
    dest = Path(out) if out is not None else src / DEFAULT_NAMES[fmt]
    if dest.is_dir():
        raise UserError(f"--out {dest} is a folder; give a file name")
    if not dest.parent.is_dir():
        raise UserError(f"--out {dest}: the folder {dest.parent} does not exist")
    x, y, split, data_matches = _check_images(config, metrics, max_images)
    mean, std = tuple(config["mean"]), tuple(config["std"])
    # A batch of 2 to export with: the exported batch size stays free (1 would fix it).
    example = next(_batches(x, y, mean, std, size=2))
    meta = {
        "rtft_export": "1", "arch": config["spec"]["model"]["arch"],
        "classes": config["classes"], "input_size": list(example.shape[1:]),
        "input": "float32 NCHW RGB, scaled to [0, 1], then (x - mean) / std per channel",
        "mean": list(mean), "std": list(std), "weights_sha256": metrics.get("sha256", ""),
        "source": str(src.resolve()), "test_acc": str(metrics.get("test", {}).get("acc")),
    }
    # Beside the destination: the final os.replace is a rename within one filesystem.
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        exporter = write_export(model, fmt, example, tmp, meta)
        diff, agree, first_bad = _compare(model, fmt, tmp, _batches(x, y, mean, std))
        n = len(y)
        if agree < n:
            i, ours, theirs = first_bad
            names = config["classes"]
            raise UserError(
                f"the {fmt} export is refused: its top-1 class differs from PyTorch's on "
                f"{n - agree} of {n} {split} images (first: image {i}, PyTorch "
                f"{names[ours]!r}, {fmt} {names[theirs]!r}; max abs logit difference "
                f"{diff:.3g}); nothing was written")
        honour_umask(tmp)  # the mode of the model folder's other files, whoever wrote it
        os.replace(tmp, dest)  # atomic: the destination is the checked file or untouched
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(dest, fmt, exporter, dest.stat().st_size, diff, agree / n, n, split,
                        data_matches)


def _check_images(config: dict, metrics: dict, max_images: int | None
                  ) -> tuple[Any, torch.Tensor, str, bool]:
    """The uint8 images the export is checked on: the promoted spec's held-out test split
    (its validation split where it has no test split), at most `max_images` of them."""
    data = DataSpec.model_validate(config["spec"]["data"])
    splits = prepare(data)
    x, y, split = splits.test_x, splits.test_y, "test"
    if len(y) == 0:
        x, y, split = splits.val_x, splits.val_y, "val"
    if len(y) == 0:
        raise UserError("the promoted spec's data has neither a test nor a validation split "
                        "to check the export on")
    if max_images is not None and max_images < len(y):
        # The splits are a fixed shuffle, so a prefix is a sample of every class.
        first = torch.arange(max_images)
        x, y = (x[first] if isinstance(x, torch.Tensor) else x.subset(first)), y[first]
    recorded = (metrics.get("data") or {}).get("sha256")
    return x, y, split, recorded == splits.fingerprint.get("sha256")


def _batches(x: Any, y: torch.Tensor, mean: tuple, std: tuple, size: int = _BATCH
             ) -> Iterator[torch.Tensor]:
    """Normalised float batches of the uint8 images `x` (tensors or files), in order."""
    for xb, _ in iter_batches(x, y, torch.arange(len(y)), size, device=torch.device("cpu")):
        yield normalize(xb, mean, std)


def write_export(model: nn.Module, fmt: str, example: torch.Tensor, path: Path,
                 meta: dict[str, Any]) -> str:
    """Write `model` (eval mode) to `path` in `fmt` with `meta` inside; returns how it was
    made. An exporter's refusal becomes a UserError naming the operator where it says one."""
    model.eval()
    try:
        if fmt == "onnx":
            return _write_onnx(model, example, path, meta)
        with torch.no_grad(), _quiet_jit():
            # check_trace off: the check below runs the saved file on real images instead.
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={_TS_META: json.dumps(meta)})
        return f"torch.jit.trace, torch {torch.__version__}"
    except ImportError as e:
        raise UserError(f"exporting to {fmt} needs {e.name or 'a package'}: pip install "
                        f"'raytune-ft[export]'") from e
    except UserError:
        raise
    except Exception as e:  # the exporters raise many types; each becomes one line
        op = _operator(e)
        what = f"operator {op} is not supported by the {fmt} exporter" if op \
            else f"the {fmt} exporter failed: {first_line(e)}"
        raise UserError(f"{meta.get('arch', 'this model')} cannot be exported to {fmt}: {what}"
                        f" (torch {torch.__version__}); try the other --format") from e


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """File descriptor 1 to /dev/null: when the TorchScript exporter fails it prints the whole
    graph (100 KB for a ViT) to the process's stdout from C++ (torch 2.14 enables that log
    and never disables it); the error itself is raised and reported as one line."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch 2.14 warns on every jit call that TorchScript is deprecated: TorchScript is the
    format asked for here (torch is pinned to <= 2.14.1), so the CLI does not repeat it. The
    tracer's warnings that a Python value becomes a constant (shape checks in attention) are
    what the check on real images, at other batch sizes than the traced one, answers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> str:
    import onnx

    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size >= 2**31:  # protobuf's limit: ONNX would spill the weights into other files
        raise UserError(f"{meta.get('arch')} has {size / 2**30:.1f} GiB of weights, over the "
                        f"2 GiB a single ONNX file holds; use --format torchscript")

    # The TorchScript-based exporter: the torch.export-based one (dynamo=True) needs
    # onnxscript and took 6-25x longer on these networks (resnet18 17 s against 3 s).
    # With grad on (even for a caller under no_grad): without it nn.MultiheadAttention takes
    # its fused fast path (aten::_native_multi_head_attention), which has no ONNX form.
    with torch.enable_grad(), _native_stdout_silenced(), _quiet_jit():
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["image"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {k: json.dumps(v) if k in _JSON_KEYS else str(v)
                                        for k, v in meta.items()})
    onnx.save(proto, str(path))
    return "torch.onnx (TorchScript exporter), opset 17"


# How exporters name an operator they cannot write: the TorchScript exporter as "operator
# 'aten::x'" or "unrecognized namespace ns::x", torch.export's as "aten.x.default".
_OPS = (re.compile(r"operator '([\w:.]+)'"), re.compile(r"unrecognized namespace ([\w:]+)"),
        re.compile(r"\b((?:aten|prim|quantized|torchvision)(?:::|\.)[A-Za-z_]\w*)"))


def _operator(e: BaseException) -> str | None:
    """The first operator an exporter's error (or its causes) names, as `ns::name`."""
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for pattern in _OPS:
            if m := pattern.search(str(err)):
                return m.group(1).replace(".", "::", 1).split(".")[0]
        err = err.__cause__ or err.__context__
    return None


def _runner(fmt: str, path: Path) -> Any:
    """A function running the exported file at `path` on a normalised batch → logits."""
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # as many as PyTorch uses
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda xb: torch.from_numpy(session.run(["logits"], {"image": xb.numpy()})[0])
    with _quiet_jit():
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda xb: loaded(xb)


@torch.no_grad()
def _compare(model: nn.Module, fmt: str, path: Path, batches: Iterator[torch.Tensor]
             ) -> tuple[float, int, tuple[int, int, int] | None]:
    """(max abs logit difference, images whose top-1 agrees, first disagreement as (image,
    PyTorch class, export class)) of the file at `path` against `model`."""
    run = _runner(fmt, path)
    diff, agree, seen, first_bad = 0.0, 0, 0, None
    for xb in batches:
        ours, theirs = model(xb).float(), run(xb).float()
        if theirs.shape != ours.shape:
            raise UserError(f"the {fmt} export returns shape {tuple(theirs.shape)} for a "
                            f"batch where PyTorch returns {tuple(ours.shape)}")
        d = (ours - theirs).abs().max().item()
        diff = max(diff, d) if d == d else float("inf")  # NaN logits count as no match
        same = ours.argmax(1) == theirs.argmax(1)
        agree += int(same.sum())
        if first_bad is None and not bool(same.all()):
            i = int((~same).nonzero()[0])
            first_bad = (seen + i, int(ours[i].argmax()), int(theirs[i].argmax()))
        seen += len(xb)
    return diff, agree, first_bad


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The rtft metadata inside an exported file (ONNX or TorchScript), lists decoded."""
    p = Path(path)
    if p.suffix == ".onnx":
        import onnx

        # load_external_data off: only the properties are wanted, not the weights.
        proto = onnx.load(str(p), load_external_data=False)
        props = {prop.key: prop.value for prop in proto.metadata_props}
        return {k: json.loads(v) if k in _JSON_KEYS else v for k, v in props.items()}
    files = {_TS_META: ""}
    with _quiet_jit():
        torch.jit.load(str(p), map_location="cpu", _extra_files=files)
    return json.loads(files[_TS_META])
