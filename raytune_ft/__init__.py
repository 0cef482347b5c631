"""raytune-ft: hyperparameter search for fine-tuning pretrained image models on Ray Tune."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["load_promoted"]

if TYPE_CHECKING:
    from raytune_ft.promote import PromotedModel


def load_promoted(path: Any, *, verify: bool = True) -> PromotedModel:
    """Load a promoted model folder (see :func:`raytune_ft.promote.load_promoted`)."""
    from raytune_ft.promote import load_promoted as _load

    return _load(path, verify=verify)
