"""Distillation's one driver-side step: the teacher's logits on the training images.

A search with `model.teacher: models/<name>/vN` trains its students against a promoted model.
The teacher runs once, here, in the driver before Ray starts (eval mode, its own mean/std, on
the unaugmented training images); its logits ride with the splits to every trial through
Ray's object store, so no trial ever loads or runs the teacher. With `augment` other than
`none` a student sees augmented images and the teacher's logits of the originals: the usual
approximation of offline distillation.

What the search used is recorded in the run folder (`teacher.json`, :func:`record_teacher`): the
teacher's path, version, weights sha256 and test accuracy, the thread count and device its
logits were computed with, and the logits' own sha256. `rtft reproduce` of a distilled trial
(:func:`reproduction_teacher`) finds that teacher again, refuses one whose weights changed or
that is gone, and recomputes its logits here, exactly as the search did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from raytune_ft.checkpoint import file_sha256
from raytune_ft.data import Splits, iter_batches, normalize
from raytune_ft.errors import UserError
from raytune_ft.promote import PromotedModelError, load_promoted
from raytune_ft.spec.schema import Spec
from raytune_ft.train import pick_device

__all__ = ["TEACHER_FILE", "check_same_teacher", "check_teacher_classes", "logits_sha256",
           "read_teacher_record", "record_teacher", "reproduction_teacher", "teacher_record",
           "with_teacher_logits"]

# The run folder's record of the teacher a search distilled from (beside data.json).
TEACHER_FILE = "teacher.json"


def _brief(classes: list[str], n: int = 6) -> str:
    return ", ".join(classes[:n]) + (f", … ({len(classes)} in all)" if len(classes) > n else "")


def check_teacher_classes(spec: Spec, teacher_classes: list[str], classes: list[str]) -> None:
    """A teacher must predict the data's classes, in the same order (its logits are the
    student's soft targets, column for column); raises :class:`UserError` otherwise."""
    if list(teacher_classes) != list(classes):
        raise UserError(f"{spec.model.teacher!r} predicts other classes than the data's: teacher "
                        f"[{_brief(teacher_classes)}], data [{_brief(classes)}]; allowed: a "
                        f"teacher promoted on the same classes", field="model.teacher")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `n` for the block (unchanged when None)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def with_teacher_logits(spec: Spec, splits: Splits, *, batch_size: int = 256,
                        threads: int | None = None) -> Splits:
    """`splits` with `teacher_logits` (float32, CPU, one row per training image) filled in;
    `splits` itself when the spec names no teacher. `threads`: torch's CPU threads for the
    teacher's forward (default: the process's own, as the search runs it). Raises
    :class:`UserError` for a teacher that is not a promoted model, predicts other classes or
    takes another image size."""
    path = spec.model.teacher
    if path is None:
        return splits
    with _threads(threads):
        return _with_logits(spec, splits, batch_size)


def _with_logits(spec: Spec, splits: Splits, batch_size: int) -> Splits:
    path = str(spec.model.teacher)
    try:
        teacher = load_promoted(path)
    except PromotedModelError as e:
        raise UserError(str(e), field="model.teacher") from e
    check_teacher_classes(spec, teacher.classes, splits.classes)
    size = int(splits.train_x[0].shape[-1])
    t_size = teacher.config["spec"]["data"].get("image_size")
    # Kept simple: no resizing here; the student's data.image_size must be the teacher's.
    if t_size is not None and int(t_size) != size:
        raise UserError(f"{path!r} takes {t_size}-px images, the data here is {size} px; set "
                        f"data.image_size: {t_size} (resizing for a teacher is not supported)",
                        field="model.teacher")
    device = pick_device(spec.train.device)
    model = teacher.model.to(device).eval()
    mean, std = tuple(teacher.config["mean"]), tuple(teacher.config["std"])
    out = [model(normalize(xb, mean, std)).float().cpu()
           for xb, _ in iter_batches(splits.train_x, splits.train_y,
                                     torch.arange(len(splits.train_y)), batch_size,
                                     device=device)]
    logits = torch.cat(out) if out else torch.zeros(0, splits.num_classes)
    return dataclasses.replace(splits, teacher_logits=logits)


# --------------------------------------------------------------------------------------------
# What the search distilled from, recorded; found again by `rtft reproduce`
# --------------------------------------------------------------------------------------------
def logits_sha256(logits: torch.Tensor) -> str:
    """sha256 of a float32 logits tensor's bytes (row-major): equal only when every bit is."""
    return hashlib.sha256(logits.detach().float().contiguous().cpu().numpy().tobytes()
                          ).hexdigest()


def teacher_record(spec: Spec, by_size: dict[int, Splits]) -> dict[str, Any] | None:
    """What `teacher.json` holds for a search with `model.teacher` (None without one): the
    path as the spec gives it and resolved, the promoted model's name and version, its weights'
    sha256 (hashed now, and equal to its metrics.json's, which loading it checked), its
    held-out test accuracy, the device and torch thread count its logits were computed with in
    this process, and the sha256 of those logits per input size."""
    path = spec.model.teacher
    if path is None:
        return None
    folder = Path(path).expanduser().resolve()
    metrics = json.loads((folder / "metrics.json").read_text())
    sha = file_sha256(folder / "model.safetensors")
    if sha != metrics.get("sha256"):
        raise UserError(f"{path!r} changed while the search started: model.safetensors' sha256 "
                        f"{sha[:16]}… is not its metrics.json's; allowed: a promoted teacher "
                        f"left as it is", field="model.teacher")
    return {"path": str(path), "resolved": str(folder), "name": folder.parent.name,
            "version": folder.name, "sha256": sha, "arch": metrics.get("arch"),
            "test_acc": (metrics.get("test") or {}).get("acc"),
            "created": metrics.get("created"),
            "device": str(pick_device(spec.train.device)), "threads": torch.get_num_threads(),
            "logits_sha256": {str(k): logits_sha256(s.teacher_logits)
                              for k, s in by_size.items() if s.teacher_logits is not None}}


def read_teacher_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's `teacher.json`, or None when it has none (no teacher, or a run of an rtft
    before the teacher was recorded)."""
    path = Path(run_dir) / TEACHER_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError("no sha256")
    except ValueError as e:
        raise UserError(f"{path} is not the teacher record rtft wrote ({e})",
                        file=str(path)) from e
    return record


def check_same_teacher(run_dir: Path, spec: Spec) -> None:
    """A resume, before any work or write: the teacher the spec names has the weights the run
    recorded in `teacher.json` (nothing to check without a teacher or a record)."""
    before = read_teacher_record(run_dir) if spec.model.teacher is not None else None
    if before is None:
        return
    weights = Path(spec.model.teacher).expanduser() / "model.safetensors"
    now = file_sha256(weights) if weights.is_file() else "missing"
    if now != before["sha256"]:
        raise UserError(f"the teacher {spec.model.teacher!r} is not the one this run started "
                        f"with: weights sha256 {now[:16]}…, recorded {before['sha256'][:16]}… "
                        f"({Path(run_dir) / TEACHER_FILE}); allowed: resume with that teacher",
                        field="model.teacher")


def record_teacher(run_dir: Path, spec: Spec, by_size: dict[int, Splits]) -> None:
    """Write `teacher.json` into the run folder (nothing without a teacher). A resumed run
    must distil from the teacher it started with: one whose weights changed is refused."""
    record = teacher_record(spec, by_size)
    if record is None:
        return
    before = read_teacher_record(run_dir)
    if before is not None and before["sha256"] != record["sha256"]:
        raise UserError(f"the teacher {spec.model.teacher!r} is not the one this run started "
                        f"with: weights sha256 {record['sha256'][:16]}…, recorded "
                        f"{before['sha256'][:16]}… ({Path(run_dir) / TEACHER_FILE}); allowed: "
                        f"resume with that teacher", field="model.teacher")
    tmp = Path(run_dir) / f".{TEACHER_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(Path(run_dir) / TEACHER_FILE)


def _where(record: dict[str, Any], spec: Spec) -> Path | None:
    """The teacher's folder here: the spec's path (a relative one from the folder rtft runs
    in, as the search read it), else the absolute path recorded at search time."""
    for value in (spec.model.teacher, record.get("resolved")):
        if value and (Path(value).expanduser() / "model.safetensors").is_file():
            return Path(value).expanduser()
    return None


def reproduction_teacher(run_dir: Path, spec: Spec, splits: Splits,
                         echo: Callable[[str], None] = print) -> Splits:
    """For `rtft reproduce` of a trial of `spec` (its run in `run_dir`): `splits` with the
    teacher's logits, recomputed as the search computed them (its device and thread count),
    from the teacher `teacher.json` names, its weights' sha256 checked against the one
    recorded. Raises :class:`UserError` (nothing trained) when that teacher is gone or its
    weights changed. A run without `teacher.json` (an rtft before it was recorded) uses the
    teacher its spec names, unchecked beyond its own metrics.json, and says so."""
    if spec.model.teacher is None:
        return splits
    record = read_teacher_record(run_dir)
    record_file = Path(run_dir) / TEACHER_FILE
    if record is None:
        echo(f"teacher: {spec.model.teacher} (no {TEACHER_FILE} in the run: its weights are "
             f"checked against its own metrics.json only)")
        return with_teacher_logits(spec, splits)
    sha, named = record["sha256"], f"{record.get('name')}/{record.get('version')}"
    folder = _where(record, spec)
    paths = dict.fromkeys(str(v) for v in (record.get("path"), record.get("resolved")) if v)
    allowed = (f"allowed: the teacher the search used ({named}, weights sha256 {sha[:16]}…) "
               f"at {' or '.join(repr(v) for v in paths)}")
    spec_file = str(Path(run_dir) / "spec.yaml")
    if folder is None:
        raise UserError(f"the teacher {record.get('path')!r} this trial was distilled from is "
                        f"not here (recorded in {record_file}); {allowed}",
                        file=spec_file, field="model.teacher")
    now = file_sha256(folder / "model.safetensors")
    if now != sha:
        raise UserError(f"the teacher {str(folder)!r} changed since the search: weights sha256 "
                        f"{now[:16]}…, recorded {sha[:16]}… ({record_file}); {allowed}",
                        file=spec_file, field="model.teacher")
    teacher_spec = spec.model_copy(update={"model": spec.model.model_copy(
        update={"teacher": str(folder)})})
    device = record.get("device") or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"  # the trial's own device check has said what it must already
    out = with_teacher_logits(
        teacher_spec.model_copy(update={"train": spec.train.model_copy(
            update={"device": "cuda" if device.startswith("cuda") else "cpu"})}),
        splits, threads=record.get("threads"))
    size = str(int(splits.train_x[0].shape[-1]))
    want = (record.get("logits_sha256") or {}).get(size)
    got = logits_sha256(out.teacher_logits)
    same = "identical to the search's" if got == want else (
        f"NOT identical to the search's (sha256 {got[:12]}…, recorded {str(want)[:12]}…)")
    echo(f"teacher: {folder} ({named}, weights sha256 {sha[:16]}… as recorded); its logits "
         f"on {len(out.teacher_logits)} training images, {device}, "
         f"{record.get('threads')} thread(s): {same}")
    return out
