"""The spec's `track:` section: where a search is also recorded (MLflow, optional).

    track:
      mlflow:
        uri: http://127.0.0.1:5000      # the tracking server (or file:, sqlite:, databricks, …)
        experiment: my-experiment       # default: the run's name
        registered_model: my-model      # default: the run's name
        registry: true                  # each promoted model → a new Model Registry version

Only the form of the URI is checked here (no import of mlflow, no network): whether the
package is installed and a local store's folder can be written are checks of the dry run
(:mod:`raytune_ft.preflight`); what the search logs is :mod:`raytune_ft.search.tracking`.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import field_validator

from raytune_ft.knobs import Strict

__all__ = ["SCHEMES", "MlflowSpec", "TrackSpec", "check_mlflow_uri", "local_store_path"]

# The tracking URI schemes MLflow's own stores answer to (mlflow.tracking._tracking_service.
# utils: the REST store, the file store, the SQLAlchemy stores, Databricks); a database scheme
# may name its driver (`postgresql+psycopg2://`).
SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")
_ALLOWED = ("allowed: http(s)://HOST:PORT (a tracking server), file:PATH, sqlite:///PATH, "
            "postgresql://, mysql://, mssql://, databricks")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,199}")


def check_mlflow_uri(uri: str) -> str:
    """`uri` when MLflow can open it as a tracking store; ValueError naming what is allowed
    otherwise. A password in an http(s) URI is refused: the spec is written to the run
    folder (`spec.yaml`) in clear; MLflow reads credentials from its environment instead."""
    scheme, sep, _ = uri.partition(":")
    base = scheme.split("+", 1)[0].lower()
    if uri == "databricks":  # the default Databricks profile
        return uri
    if not sep or base not in SCHEMES:
        hint = ""
        if re.fullmatch(r"[\w.-]+:\d+(/.*)?", uri):
            hint = f" Did you mean 'http://{uri}'?"
        elif not sep:
            hint = f" A local folder is written 'file:{uri}'."
        raise ValueError(f"{uri!r} is not a tracking URI MLflow opens; {_ALLOWED}.{hint}")
    parts = urlsplit(uri)
    if base in ("http", "https") and not parts.hostname:
        raise ValueError(f"{uri!r} names no host; allowed: http(s)://HOST:PORT")
    if parts.password is not None:  # any scheme: postgresql://user:pw@host/db too
        raise ValueError("a password in the tracking URI would be written to the run "
                         "folder's spec.yaml in clear; allowed: the URI without it, and "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                         "MLFLOW_TRACKING_TOKEN, or the database's own client settings) in "
                         "the environment")
    if base == "sqlite" and (not uri.startswith("sqlite:///") or uri == "sqlite:///"):
        raise ValueError(f"{uri!r}: an in-memory or malformed SQLite store keeps nothing; "
                         f"allowed: sqlite:///relative/path.db or sqlite:////absolute/path.db")
    return uri


def local_store_path(uri: str) -> str | None:
    """The local file or folder a `file:` / `sqlite:` tracking URI writes (None for a
    server or a database elsewhere): the folder of the file store, the SQLite database file."""
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        return parts.path or None
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///") or None  # sqlite:////abs → /abs
    return None


class MlflowSpec(Strict):
    uri: str
    experiment: str | None = None  # default: the run's name
    registered_model: str | None = None  # default: the run's name
    registry: bool = True  # promoted models → Model Registry versions

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_mlflow_uri(v)

    @field_validator("experiment", "registered_model")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.fullmatch(v):
            raise ValueError(f"{v!r}: allowed: 1-200 letters, digits, spaces, '.', '_' or '-', "
                             f"starting with a letter or digit")
        return v


class TrackSpec(Strict):
    mlflow: MlflowSpec | None = None  # off unless given
