"""What a location string in a spec or on the command line is (a storage URI or a local path),
and where rtft keeps its cache.

Standard library only: the CLI, the spec schema and the search driver all ask this.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "is_uri"]


def is_uri(path: str) -> bool:
    """True for a storage URI such as s3://bucket/x or gs://bucket/x (not a local path).

    Decided by the `scheme://` marker alone, never by asking the filesystem: a URI names
    storage this machine may not reach, and a path that does not exist yet is still a path.
    """
    return "://" in path


def cache_dir() -> Path:
    """rtft's cache (pretrained backbones, staging copies of s3:// runs): $RTFT_CACHE, else
    the user's cache folder."""
    env = os.environ.get("RTFT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "rtft"
    return base.expanduser()
