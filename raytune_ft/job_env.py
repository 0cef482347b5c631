"""What a Ray job takes from this shell besides the spec: HTTP headers for the Jobs API (auth)
and environment variables for the job, parsed from flags and the environment, and never
printed with their values (:func:`describe_headers`, :func:`redact`).

Standard library only, so the spec schema can re-export :func:`redact` without importing
anything of the Jobs machinery; :mod:`raytune_ft.jobs` is what uses all of this.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from raytune_ft.errors import JobsError

__all__ = ["HEADERS_ENV", "describe_headers", "parse_env", "parse_headers", "redact"]

# Headers as a JSON object or `Name: value` lines; read after Ray's own RAY_JOB_HEADERS.
HEADERS_ENV = "RTFT_JOB_HEADERS"


def _header_lines(text: str, origin: str) -> dict[str, str]:
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise JobsError(f"{origin}: not a JSON object ({e.msg}); allowed: "
                            f'{{"Authorization": "Bearer …"}} or "Name: value" lines') from e
        if not isinstance(data, dict):
            raise JobsError(f"{origin}: a JSON object of header names to values is needed")
        return {str(k): str(v) for k, v in data.items()}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip():
            out.update(_one_header(line, origin))
    return out


def _one_header(value: str, origin: str) -> dict[str, str]:
    name, sep, rest = value.partition(":")
    if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
        # The value is not echoed: it may be a token pasted in the wrong place.
        raise JobsError(f"{origin}: a header must look like 'Name: value' (e.g. "
                        f"'Authorization: Bearer <token>'); got something without a name and "
                        f"a colon")
    return {name.strip(): rest.strip()}


def parse_headers(values: Sequence[str] = (),
                  env: Mapping[str, str] | None = None) -> dict[str, str]:
    """HTTP headers for the Jobs API: `RAY_JOB_HEADERS`, then `RTFT_JOB_HEADERS` (a JSON object
    or `Name: value` lines), then each `--header 'Name: value'`; later ones win."""
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    for var in ("RAY_JOB_HEADERS", HEADERS_ENV):
        if env.get(var):
            out.update(_header_lines(env[var], f"${var}"))
    for v in values:
        out.update(_one_header(v, "--header"))
    return out


def parse_env(values: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`--env NAME=VALUE` or `--env NAME` (copied from this environment) → env_vars."""
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not name or not name.replace("_", "a").isalnum():
            raise JobsError(f"--env: {name!r} is not an environment variable name")
        if not sep:
            if name not in env:
                raise JobsError(f"--env {name}: not set in this environment; give "
                                f"--env {name}=VALUE")
            value = env[name]
        out[name] = value
    return out


def describe_headers(headers: Mapping[str, str]) -> str:
    """Header names only, never their values: safe to print."""
    return ", ".join(f"{k}: ***" for k in headers) or "none"


# Environment variable names whose values are secrets (matched anywhere in the name, any case).
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|^AWS_|^RAY_AUTH",
                          re.IGNORECASE)


def redact(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `mapping` whose secret-looking keys (TOKEN, KEY, SECRET, PASSWORD, AWS_*,
    RAY_AUTH*, …) have their values replaced by "***", in nested mappings and lists too.

    For everything written or printed that may hold environment variables (a runtime_env's
    `env_vars`, a submitted job's settings): the names stay visible, the values never do.
    """
    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return redact(value)
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return {k: "***" if isinstance(k, str) and _SECRET_NAME.search(k) else clean(v)
            for k, v in mapping.items()}
