"""Distillation's one driver-side step: the teacher's logits on the training images.

A search with `model.teacher: models/<name>/vN` trains its students against a promoted model.
The teacher runs once, here, in the driver before Ray starts (eval mode, its own mean/std, on
the unaugmented training images); its logits ride with the splits to every trial through
Ray's object store, so no trial ever loads or runs the teacher. With `augment` other than
`none` a student sees augmented images and the teacher's logits of the originals: the usual
approximation of offline distillation.
"""

from __future__ import annotations

import dataclasses

import torch

from raytune_ft.data import Splits, iter_batches, normalize
from raytune_ft.errors import UserError
from raytune_ft.promote import PromotedModelError, load_promoted
from raytune_ft.spec.schema import Spec
from raytune_ft.train import pick_device

__all__ = ["check_teacher_classes", "with_teacher_logits"]


def _brief(classes: list[str], n: int = 6) -> str:
    return ", ".join(classes[:n]) + (f", … ({len(classes)} in all)" if len(classes) > n else "")


def check_teacher_classes(spec: Spec, teacher_classes: list[str], classes: list[str]) -> None:
    """A teacher must predict the data's classes, in the same order (its logits are the
    student's soft targets, column for column); raises :class:`UserError` otherwise."""
    if list(teacher_classes) != list(classes):
        raise UserError(f"{spec.model.teacher!r} predicts other classes than the data's: teacher "
                        f"[{_brief(teacher_classes)}], data [{_brief(classes)}]; allowed: a "
                        f"teacher promoted on the same classes", field="model.teacher")


@torch.no_grad()
def with_teacher_logits(spec: Spec, splits: Splits, *, batch_size: int = 256) -> Splits:
    """`splits` with `teacher_logits` (float32, CPU, one row per training image) filled in;
    `splits` itself when the spec names no teacher. Raises :class:`UserError` for a teacher
    that is not a promoted model, predicts other classes or takes another image size."""
    path = spec.model.teacher
    if path is None:
        return splits
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
