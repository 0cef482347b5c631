"""Ray's results as plain :class:`~raytune_ft.runs.TrialRecord` s: from a ResultGrid after a
search, or read back from Ray's experiment folder when a run's trials.json is missing or stale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from raytune_ft.paths import is_uri
from raytune_ft.runs import (
    HISTORY_KEYS,
    TUNE_DIR,
    TrialRecord,
    records_from_json,
    run_location,
)
from raytune_ft.spec.schema import Spec


def records_from_results(results: Any, metric: str, mode: str) -> list[TrialRecord]:
    out = []
    for r in results:
        df = r.metrics_dataframe
        history = []
        if df is not None and len(df):
            cols = [c for c in HISTORY_KEYS if c in df.columns]
            rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in row.items()} for row in df[cols].to_dict("records")]
            # A trial retried or resumed from an earlier checkpoint (or from none) reports
            # the epochs since it again, with the same figures: one row per epoch, the last.
            by_epoch = {row.get("epoch"): row for row in rows}
            history = list(by_epoch.values()) if None not in by_epoch else rows
        best = None
        if r.best_checkpoints:
            # Ranked by best-so-far: a checkpoint holds the best epoch's weights so far, so
            # the latest is the best (runs from rtft <= 0.2 hold no best_<metric>).
            key = f"best_{metric}"
            ranked_by = key if all(key in m for _, m in r.best_checkpoints) else metric
            ckpt = r.get_best_checkpoint(ranked_by, mode)
            best = ckpt.path if ckpt else None
            scheme = getattr(getattr(ckpt, "filesystem", None), "type_name", "local")
            if best and scheme not in ("local", "mock"):  # keep the URI: s3://bucket/...
                best = f"{'gs' if scheme == 'gcs' else scheme}://{best.lstrip('/')}"
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name.removeprefix("trial_")
        out.append(TrialRecord(trial_id=trial_id, params=dict(r.config or {}), history=history,
                               best_checkpoint=best,
                               error=str(r.error).strip().splitlines()[-1] if r.error else None))
    return sorted(out, key=lambda t: t.trial_id)


def load_records(run_dir: str | Path, spec: Spec) -> list[TrialRecord]:
    """The trials of a finished (or interrupted) run: its trials.json when that is current,
    else read back through Ray's ResultGrid."""
    if not is_uri(spec.run.storage_path) and (fast := records_from_json(Path(run_dir))):
        return fast  # without importing Ray: `rtft results` answers at once
    from ray.tune import ExperimentAnalysis, ResultGrid

    path = (run_location(spec).tune_path if is_uri(spec.run.storage_path)
            else str(Path(run_dir).resolve() / TUNE_DIR))
    analysis = ExperimentAnalysis(path,
                                  default_metric=spec.metric,
                                  default_mode=spec.mode)
    return records_from_results(ResultGrid(analysis), spec.metric, spec.mode)

