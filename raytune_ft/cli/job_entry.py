"""The entrypoint of an rtft Ray job on the cluster (`rtft submit` builds it in `jobs.py`).

It imports the CLI; `jobs.py` only names this module in the entrypoint string, so the
imports run one way: cli -> jobs, job_entry -> cli.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from raytune_ft.cli import main as cli


def main(argv: Sequence[str]) -> int:
    """`python -m raytune_ft.cli.job_entry ARGS…`: run `rtft ARGS…` in a private copy of the job's
    working dir; returns rtft's exit code.

    Seen with Ray 2.60: when a trial's runtime env is set up on the head node, Ray unpacks the
    job's working_dir package again (`overwrite=True`: rmtree, then extract), so the driver's
    current folder is deleted under it and Tune's final `os.path.relpath` (which calls
    `os.getcwd()`) fails with FileNotFoundError after every trial has finished. A copy that
    only this process owns cannot vanish; relative paths in the spec mean the same there.
    """
    src = Path.cwd()
    work = Path(tempfile.mkdtemp(prefix="rtft-job-cwd-"))
    try:
        shutil.copytree(src, work, dirs_exist_ok=True, symlinks=True)
        os.chdir(work)
        try:
            cli.main(args=list(argv), prog_name="rtft", standalone_mode=True)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0
    finally:
        os.chdir(src if src.exists() else "/")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
