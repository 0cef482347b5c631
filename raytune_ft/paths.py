"""What a location string in a spec or on the command line is: a storage URI or a local path.

Standard library only: the CLI, the spec schema and the search driver all ask this.
"""

from __future__ import annotations

__all__ = ["is_uri"]


def is_uri(path: str) -> bool:
    """True for a storage URI such as s3://bucket/x or gs://bucket/x (not a local path).

    Decided by the `scheme://` marker alone, never by asking the filesystem: a URI names
    storage this machine may not reach, and a path that does not exist yet is still a path.
    """
    return "://" in path
