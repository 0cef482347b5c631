"""Where a run's files go: a local folder (shared by every node on a cluster), or an s3:// /
gs:// URI.

Ray writes its experiment (checkpoints, results, TensorBoard files) to the URI itself, from
the node each trial runs on. rtft's own run files (`runs.RUN_FILES`) are staged locally on the
driver's machine and uploaded here after every finished trial and at the end; promotion
downloads only the checkpoints it reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from raytune_ft.errors import UserError
from raytune_ft.paths import is_uri
from raytune_ft.runs import RUN_FILES, TUNE_DIR, RunLocation, TrialRecord, run_location
from raytune_ft.selection import choose_for
from raytune_ft.spec.schema import Spec


def _fs(uri: str) -> tuple[Any, str]:
    """pyarrow filesystem and path for a URI (endpoint and credentials from the environment:
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, … for S3 and S3-compatible stores such as MinIO)."""
    import pyarrow
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        raise UserError(f"cannot open {uri}: {e}; allowed: s3://bucket/prefix or "
                        f"gs://bucket/prefix, with credentials (and for MinIO-like stores "
                        f"AWS_ENDPOINT_URL) in the environment", field="run.storage_path") from e


def _exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:  # no such bucket, no access: say so before anything runs
        raise UserError(f"cannot read {uri}: {e}", field="run.storage_path") from e


def tune_exists(loc: RunLocation) -> bool:
    if loc.remote is None:
        return (loc.local / TUNE_DIR / "tuner.pkl").exists()
    return _exists(f"{loc.tune_path}/tuner.pkl")


def upload_run_files(loc: RunLocation) -> None:
    """Copy rtft's run files from the staging folder to the run's URI (no-op for a path)."""
    if loc.remote is None:
        return
    import pyarrow.fs as pafs

    fs, root = _fs(loc.remote)
    for name in RUN_FILES:
        src = loc.local / name
        if src.exists():
            pafs.copy_files(str(src), f"{root}/{name}", destination_filesystem=fs)


def download_run_files(loc: RunLocation) -> None:
    """Fetch the run files that the staging folder lacks (a resume on another machine). Files
    already here are kept: they are at least as new as the uploaded ones."""
    if loc.remote is None:
        return
    import pyarrow.fs as pafs

    fs, root = _fs(loc.remote)
    loc.local.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        dst = loc.local / name
        if not dst.exists() and fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File:
            pafs.copy_files(f"{root}/{name}", str(dst), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())


def _localize_checkpoints(records: list[TrialRecord], loc: RunLocation) -> None:
    """Download the checkpoints promotion will read (only those) into the staging folder."""
    import pyarrow.fs as pafs

    for rec in records:
        if rec.best_checkpoint and is_uri(rec.best_checkpoint):
            fs, path = _fs(rec.best_checkpoint)
            dst = loc.local / "checkpoints" / f"trial_{rec.trial_id}" / Path(path).name
            if not dst.exists():
                tmp = dst.with_name(dst.name + ".part")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)  # pyarrow copies into the folder, creating no parents
                pafs.copy_files(path, str(tmp), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                os.replace(tmp, dst)
            rec.best_checkpoint = str(dst)


def localize_checkpoints(records: list[TrialRecord], spec: Spec, *,
                         pareto: bool = False) -> list[TrialRecord]:
    """`records`, with the checkpoints promotion would read (`runs.choose_for`: the top_k
    within the spec's bounds, or the Pareto front) downloaded from an s3:// / gs:// run (to its
    staging folder); unchanged for a run on a path."""
    if is_uri(spec.run.storage_path):
        _localize_checkpoints(choose_for(spec, records, pareto=pareto), run_location(spec))
    return records

