"""Run a search as a Ray Job on a cluster: `rtft submit` and `rtft jobs …`.

This module and the `search` package are the only ones that import Ray (here: only the Jobs
SDK, and only inside functions, so `import raytune_ft.jobs` stays cheap).

What travels with a job (its `runtime_env`), and why it works both on a real cluster and on a
local one:

- `working_dir`: a small staging folder built for the job, never the whole current folder
  (which may hold runs, models and datasets). It holds the spec file at the same path relative
  to the current folder as here, and every *relative* file the spec names (`model.weights`,
  `data.root`, a `searcher.portfolio` file) at its relative path. The job's driver starts in
  that folder, so relative paths mean on the cluster what they mean here. Absolute paths are
  not shipped: they must exist on every node (shared storage), as they would for `rtft search`
  on the cluster.
- `py_modules`: the `raytune_ft` package this command runs from, so the driver and every trial
  worker run exactly the code you submit from, whatever rtft version the cluster image has.
  With `ship_code=False` the cluster's installed rtft runs. The entrypoint is
  `python -m raytune_ft.cli.job_entry search <spec> --set …`: `rtft search` run from a private
  copy of the working dir (see `job_entry` for why); it needs no `rtft` script on the cluster.
  Either way rtft's dependencies (torch, torchvision, optuna, …) must be on the cluster (its image,
  or `pip=[…]`: Ray then builds a virtualenv per node from PyPI).
- `env_vars`: only those you name (`--env`). They are visible to anyone who can read the
  dashboard; prefer credentials that live on the nodes (IAM roles, Kubernetes secrets).

Results must outlive the job: `run.storage_path` and `promote.dir` must be absolute (a shared
mount) or, for storage, an `s3://`/`gs://` URI. A relative path would resolve inside the job's
temporary working folder on the head node, so it is refused before anything is submitted.

Auth: Ray >= 2.60 turns on token authentication by default. The Jobs SDK adds the cluster token
itself when `RAY_AUTH_MODE=token` and the token is in `RAY_AUTH_TOKEN`/`RAY_AUTH_TOKEN_PATH`/
`~/.ray/auth_token`; otherwise pass headers (`--header 'Authorization: Bearer …'`, or
`RTFT_JOB_HEADERS` / Ray's `RAY_JOB_HEADERS` as a JSON object). Header values are never printed.
Parsing headers and `--env`, and redacting them, is :mod:`raytune_ft.job_env`; every failure
here is a :class:`~raytune_ft.errors.JobsError` (a UserError: one line, cause kept for --debug).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_ft.errors import JobsError, UserError, first_line

# Headers, env vars and redaction live in job_env (standard library only); re-exported here,
# where the CLI and the tests have always found them.
from raytune_ft.job_env import (
    HEADERS_ENV,
    describe_headers,
    parse_env,
    parse_headers,
    redact,
)
from raytune_ft.paths import is_uri
from raytune_ft.spec.schema import Spec
from raytune_ft.spec.yaml_io import load_spec

__all__ = ["HEADERS_ENV", "TERMINAL", "JobsError", "Submission", "client", "cluster_resources",
           "describe_headers", "follow", "job_info", "list_jobs", "logs", "parse_env",
           "parse_headers", "prepare", "redact", "stop", "submit"]

Echo = Callable[[str], None]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Address environment variables, in the order Ray's own job CLI reads them.
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


# --------------------------------------------------------------------------------------------
# What to submit
# --------------------------------------------------------------------------------------------
@dataclass
class Submission:
    """Everything a job submission needs, built and checked before talking to the cluster."""

    spec: Spec
    entrypoint: str
    runtime_env: dict[str, Any]
    staging: Path  # the working_dir folder; removed after upload
    shipped: list[str] = field(default_factory=list)  # relative paths in working_dir
    assumed: list[str] = field(default_factory=list)  # absolute paths the cluster must have

    def printable_env(self) -> dict[str, Any]:
        """The runtime_env with env var values redacted, for printing."""
        env = dict(self.runtime_env)
        if "env_vars" in env:
            env["env_vars"] = redact(env["env_vars"])
        return env


def _local_path(value: str) -> Path | None:
    """`value` as a local file or folder that exists here, else None (a weights name…)."""
    if not value or value == "none" or ":" in value.split("/")[0]:
        return None  # none, rtft:mnist, IMAGENET1K_V1-like names are not paths
    p = Path(value).expanduser()
    return p if p.exists() else None


def _stage(src: Path, rel: Path, staging: Path) -> None:
    dst = staging / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    else:
        shutil.copy2(src, dst)


def _relative_to_cwd(p: Path, cwd: Path, what: str, field_name: str) -> Path:
    try:
        return p.resolve().relative_to(cwd)
    except ValueError as e:
        raise UserError(f"{what} {str(p)!r} is a relative path outside the current folder, "
                        f"which cannot be shipped with the job; allowed: a path under the "
                        f"current folder, or an absolute path that exists on every cluster "
                        f"node", field=field_name) from e


def prepare(spec_file: str | Path, overrides: Sequence[str] = (), *,
            extra_args: Sequence[str] = (), ship_code: bool = True, pip: Sequence[str] = (),
            env_vars: Mapping[str, str] | None = None, cwd: Path | None = None) -> Submission:
    """Check the spec and build the job's entrypoint and runtime_env (see the module doc).

    Raises UserError for a spec that cannot run as a job (relative result folders, relative
    files outside the current folder). The caller removes `Submission.staging`.
    """
    cwd = (cwd or Path.cwd()).resolve()
    spec_path = Path(spec_file)
    spec = load_spec(spec_path, overrides)  # the same checks as `rtft search`
    for field_name, value in (("run.storage_path", spec.run.storage_path),
                              ("promote.dir", spec.promote.dir)):
        if not is_uri(value) and not Path(value).expanduser().is_absolute():
            raise UserError(
                f"{value!r} is relative: in a Ray job it would resolve inside the job's "
                f"temporary working folder on the head node and be lost when the job ends; "
                f"allowed: an absolute path on storage every node mounts (NFS)"
                f"{' or an s3:// / gs:// URI' if field_name == 'run.storage_path' else ''}, "
                f"e.g. --set {field_name}=/mnt/shared/"
                f"{'rtft_runs' if field_name == 'run.storage_path' else 'models'}",
                field=field_name)
    for value in spec.searcher.warm_start:  # earlier runs are read by the job's driver
        if not Path(value).expanduser().is_absolute():
            raise UserError(
                f"{value!r} is relative: a Ray job reads earlier runs on the cluster, where only "
                f"the spec and its data, weights and portfolio files are shipped; allowed: an "
                f"absolute path on storage every node mounts (where the earlier search wrote its "
                f"run)",
                field="searcher.warm_start")
    staging = Path(tempfile.mkdtemp(prefix="rtft-job-"))
    try:
        shipped, assumed = [], []
        rel_spec = (spec_path.resolve().relative_to(cwd) if spec_path.resolve().is_relative_to(cwd)
                    else Path(spec_path.name))
        _stage(spec_path, rel_spec, staging)
        shipped.append(str(rel_spec))
        w = spec.model.weights  # one value, or one per architecture of a model.arch choice
        named = ([(f"model.weights.{a}", v) for a, v in w.items()] if isinstance(w, dict)
                 else [("model.weights", w)])
        if spec.data.root:
            named.append(("data.root", spec.data.root))
        portfolio = spec.searcher.portfolio  # builtin and none are not files
        if portfolio not in ("builtin", "none"):
            named.append(("searcher.portfolio", portfolio))
        for field_name, value in named:
            p = _local_path(value)
            if p is None and field_name == "searcher.portfolio":  # no name: always a path
                p = Path(value).expanduser()
                if not p.is_absolute():
                    raise UserError(
                        f"{value!r} does not exist here, so it cannot be shipped with the job; "
                        f"allowed: builtin, none, or the path of a portfolio file under the "
                        f"current folder (or an absolute path that exists on every cluster "
                        f"node)", field=field_name)
            if p is None:
                continue
            if p.is_absolute():
                assumed.append(str(p))
                continue
            what = ("weights" if field_name.startswith("model.weights") else
                    "portfolio" if field_name == "searcher.portfolio" else "root")
            rel = _relative_to_cwd(p, cwd, what, field_name)
            _stage(p, rel, staging)
            shipped.append(str(rel))
        runtime_env: dict[str, Any] = {"working_dir": str(staging)}
        if ship_code:
            import raytune_ft

            runtime_env["py_modules"] = [str(Path(raytune_ft.__file__).parent)]
            runtime_env["excludes"] = ["__pycache__", "*.pyc"]
        # `python -m raytune_ft.cli.job_entry search …` is `rtft search …` run from a private copy
        # of the working dir (see job_entry); it needs no `rtft` script on the cluster.
        command = ["python", "-m", "raytune_ft.cli.job_entry", "search"]
        if pip:
            runtime_env["pip"] = list(pip)
        if env_vars:
            runtime_env["env_vars"] = dict(env_vars)
        args = [str(rel_spec), *[a for o in overrides for a in ("--set", o)], *extra_args]
        entrypoint = shlex.join(command + args)
        return Submission(spec, entrypoint, runtime_env, staging, shipped, assumed)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# The Jobs API
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _explicit_address(address: str | None) -> Iterator[None]:
    """Ray's client lets RAY_API_SERVER_ADDRESS/RAY_ADDRESS override an explicit address; an
    address given on our command line wins (click already read the env when none was)."""
    saved = {k: os.environ.pop(k) for k in ADDRESS_ENV if address and k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str | None, headers: Mapping[str, str] | None = None) -> Any:
    """A JobSubmissionClient for `address` (http://head:8265, head:6379, ray://…, auto)."""
    from ray.job_submission import JobSubmissionClient

    try:
        with _explicit_address(address):
            return JobSubmissionClient(address, headers=dict(headers or {}))
    except Exception as e:  # connection refused, auth, no cluster: one readable line
        raise JobsError(f"cannot reach the Ray Jobs API at {address or '(auto-detect)'}: "
                        f"{_reason(e)}") from e


def _reason(e: BaseException) -> str:
    """The first line of `e`, and how to authenticate when it says the cluster refused us."""
    text = str(e)
    if "401" in text or "403" in text or "uthenticat" in text:
        return (f"{first_line(e)}; the cluster wants its auth token: set RAY_AUTH_MODE=token "
                f"and RAY_AUTH_TOKEN (or ~/.ray/auth_token), or pass --header 'Authorization: "
                f"Bearer <token>' (or ${HEADERS_ENV})")
    return first_line(e)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except JobsError:
        raise
    except Exception as e:
        raise JobsError(_reason(e)) from e


def submit(spec_file: str | Path, address: str | None, overrides: Sequence[str] = (), *,
           wait: bool = False, headers: Mapping[str, str] | None = None,
           ship_code: bool = True, pip: Sequence[str] = (),
           env_vars: Mapping[str, str] | None = None, extra_args: Sequence[str] = (),
           echo: Echo = print) -> tuple[str, str | None]:
    """Submit the search in `spec_file` as a Ray Job; returns (submission id, final status or
    None). With `wait`, streams the job's logs until it ends."""
    sub = prepare(spec_file, overrides, extra_args=extra_args, ship_code=ship_code, pip=pip,
                  env_vars=env_vars)
    try:
        c = client(address, headers)
        import raytune_ft

        job_id = _call(lambda: c.submit_job(
            entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
            metadata={"rtft_spec": sub.spec.name, "rtft_version": raytune_ft.__version__}))
    finally:
        shutil.rmtree(sub.staging, ignore_errors=True)  # uploaded by now (or never will be)
    echo(f"submitted job {job_id} to {c.get_address()}")
    echo(f"  entrypoint:  {sub.entrypoint}")
    echo(f"  shipped:     {', '.join(sub.shipped)}"
         + (" + raytune_ft (py_modules)" if ship_code else ""))
    if sub.assumed:
        echo(f"  on cluster:  {', '.join(sub.assumed)} (absolute: must exist on every node)")
    if env_vars:
        echo(f"  env_vars:    {json.dumps(redact(dict(env_vars)))}")
    echo(f"  results:     {sub.spec.run.storage_path}/{sub.spec.name}; models: "
         f"{sub.spec.promote.dir}/{sub.spec.name}")
    if not wait:
        echo(f"follow it:   rtft jobs logs {job_id} --follow --address {c.get_address()}")
        return job_id, None
    return job_id, follow(c, job_id, echo)


def follow(c: Any, job_id: str, echo: Echo = print, *, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            echo(chunk.rstrip("\n"))

    try:
        asyncio.run(tail())
    except Exception as e:  # the stream may drop (head restart): fall back to polling
        echo(f"(log stream ended: {first_line(e)}; waiting for the job's status)")
    while True:  # the stream ends when the driver exits; the status follows shortly after
        status = str(_call(c.get_job_status, job_id))
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def job_info(c: Any, job_id: str) -> dict[str, Any]:
    """The job's details as the dashboard's /api/jobs/ID answers them (env values redacted)."""
    info = _call(c.get_job_info, job_id)
    data = info.dict() if hasattr(info, "dict") else dict(info.__dict__)
    env = (data.get("runtime_env") or {}).get("env_vars")
    if env:
        data["runtime_env"] = {**data["runtime_env"], "env_vars": redact(env)}
    return {k: (str(v) if k == "status" else v) for k, v in data.items()}


def list_jobs(c: Any) -> list[dict[str, Any]]:
    """All jobs of the cluster, newest first, as plain dicts."""
    jobs = [{"submission_id": j.submission_id, "job_id": j.job_id, "status": str(j.status),
             "entrypoint": j.entrypoint, "start_time": j.start_time, "end_time": j.end_time,
             "metadata": j.metadata or {}, "message": j.message}
            for j in _call(c.list_jobs)]
    return sorted(jobs, key=lambda j: j["start_time"] or 0, reverse=True)


def logs(c: Any, job_id: str, *, follow_logs: bool = False, echo: Echo = print) -> str | None:
    """Print the job's logs so far; with `follow_logs`, keep streaming until it ends."""
    if follow_logs:
        return follow(c, job_id, echo)
    echo(_call(c.get_job_logs, job_id).rstrip("\n"))
    return None


def cluster_resources(address: str, headers: Mapping[str, str] | None = None
                      ) -> dict[str, float]:
    """Total CPU and GPU of the cluster's alive nodes, read from its dashboard (the state API
    behind `ray list nodes`), with the same address and headers as the Jobs API."""
    from raytune_ft.search.ray_private import job_client_get

    c = client(address, headers)
    # The SDK's own request helper: it adds the auth headers, cookies and TLS settings.
    r = _call(lambda: job_client_get(c, "/api/v0/nodes?limit=10000"))
    try:
        r.raise_for_status()
        nodes = r.json()["data"]["result"]["result"]
    except Exception as e:
        raise JobsError(f"cannot read the nodes of {address}: {_reason(e)}") from e
    total = {"CPU": 0.0, "GPU": 0.0}
    for n in nodes:
        if n.get("state") == "ALIVE":
            for k in total:
                total[k] += float((n.get("resources_total") or {}).get(k, 0))
    return total


def stop(c: Any, job_id: str) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    return bool(_call(c.stop_job, job_id))
