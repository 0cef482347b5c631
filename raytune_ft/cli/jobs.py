"""`rtft submit` and `rtft jobs list|status|logs|stop`: searches as Ray jobs on a cluster,
through :mod:`raytune_ft.jobs` (Ray's JobSubmissionClient)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from raytune_ft.cli.common import guard, spec_options


def jobs_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--address (the Jobs API) and --header (repeatable)."""
    fn = click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
                      help="HTTP header for the Jobs API, e.g. 'Authorization: Bearer <token>' "
                           "(repeatable; also $RTFT_JOB_HEADERS / $RAY_JOB_HEADERS as JSON). "
                           "Never printed.")(fn)
    return click.option("--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
                        default=None, help="The cluster's Jobs API, http://head:8265 "
                        "(also $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS).")(fn)


def submit_and_exit(spec_file: Path, address: str | None, overrides: tuple[str, ...], *,
                     wait: bool, headers: tuple[str, ...], env: tuple[str, ...],
                     pip: tuple[str, ...], ship_code: bool,
                     extra_args: list[str] | tuple[str, ...] = ()) -> None:
    from raytune_ft import jobs

    try:
        job_id, status = jobs.submit(spec_file, address, overrides, wait=wait,
                                     headers=jobs.parse_headers(headers),
                                     env_vars=jobs.parse_env(env), pip=pip,
                                     ship_code=ship_code, extra_args=extra_args,
                                     echo=click.echo)
    except KeyboardInterrupt:
        click.echo("\nstopped following; the job goes on (rtft jobs stop ID to end it)",
                   err=True)
        sys.exit(130)
    if status is not None:
        click.echo(f"job {job_id}: {status}")
        sys.exit(0 if status == "SUCCEEDED" else 1)


@click.command()
@spec_options
@jobs_options
@click.option("--wait", is_flag=True,
              help="Stream the job's logs until it ends; exit 0 if it succeeded, 1 if not.")
@click.option("--env", "env", multiple=True, metavar="NAME[=VALUE]",
              help="Environment variable for the job (NAME alone copies it from here), e.g. "
                   "--env AWS_ENDPOINT_URL. Visible on the dashboard; printed redacted.")
@click.option("--pip", "pip", multiple=True, metavar="REQ",
              help="pip requirement Ray installs on each node for this job (repeatable).")
@click.option("--ship-code/--no-ship-code", default=True, show_default=True,
              help="Ship this raytune_ft package with the job (py_modules); without it the "
                   "cluster's installed `rtft` runs.")
@guard
def submit(spec_file: Path, overrides: tuple[str, ...], debug: bool, address: str | None,
           headers: tuple[str, ...], wait: bool, env: tuple[str, ...], pip: tuple[str, ...],
           ship_code: bool) -> None:
    """Submit the search in SPEC_FILE to a Ray cluster as a Ray job; print its id.

    The spec and the relative files it names travel with the job; run.storage_path and
    promote.dir must be absolute shared paths (or s3:// / gs:// for storage).

    \b
    Examples:
      rtft submit search_spaces/resnet.yaml --address http://127.0.0.1:8265 \\
          --set run.storage_path=/mnt/shared/rtft_runs --set promote.dir=/mnt/shared/models
      rtft submit my.yaml --wait --header "Authorization: Bearer $RAY_AUTH_TOKEN"
    """
    submit_and_exit(spec_file, address, overrides, wait=wait, headers=headers, env=env,
                     pip=pip, ship_code=ship_code)


@click.group()
def jobs() -> None:
    """Ray jobs on a cluster: list, status, logs, stop (see `rtft submit`)."""


@jobs.command("list")
@jobs_options
@click.option("--json", "as_json", is_flag=True, help="All fields as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guard
def jobs_list(address: str | None, headers: tuple[str, ...], as_json: bool, debug: bool) -> None:
    """The cluster's jobs, newest first."""
    from raytune_ft import jobs as j
    from raytune_ft.tables import text_table

    rows = j.list_jobs(j.client(address, j.parse_headers(headers)))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    body = [[r["submission_id"] or r["job_id"] or "-", r["status"],
             r["metadata"].get("rtft_spec", ""), r["entrypoint"][:60]] for r in rows]
    click.echo("\n".join(text_table(["job", "status", "spec", "entrypoint"], body)))


@jobs.command("status")
@click.argument("job_id")
@jobs_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guard
def jobs_status(job_id: str, address: str | None, headers: tuple[str, ...], debug: bool) -> None:
    """The job's status and details as JSON (as the dashboard's /api/jobs/ID shows them).

    Exit code: 0 succeeded, 1 failed or stopped, 3 still pending or running.
    """
    from raytune_ft import jobs as j

    info = j.job_info(j.client(address, j.parse_headers(headers)), job_id)
    click.echo(json.dumps(info, indent=1, default=str))
    status = info.get("status")
    sys.exit(0 if status == "SUCCEEDED" else 1 if status in j.TERMINAL else 3)


@jobs.command("logs")
@click.argument("job_id")
@jobs_options
@click.option("--follow", "-f", "follow", is_flag=True,
              help="Keep streaming until the job ends; exit with its status (0 succeeded).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guard
def jobs_logs(job_id: str, address: str | None, headers: tuple[str, ...], follow: bool,
              debug: bool) -> None:
    """The job's driver output (the search's progress lines)."""
    from raytune_ft import jobs as j

    status = j.logs(j.client(address, j.parse_headers(headers)), job_id, follow_logs=follow,
                    echo=click.echo)
    if status is not None:
        click.echo(f"job {job_id}: {status}")
        sys.exit(0 if status == "SUCCEEDED" else 1)


@jobs.command("stop")
@click.argument("job_id")
@jobs_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guard
def jobs_stop(job_id: str, address: str | None, headers: tuple[str, ...], debug: bool) -> None:
    """Stop the job (its trials end; finished ones stay in the run folder for --resume)."""
    from raytune_ft import jobs as j

    stopped = j.stop(j.client(address, j.parse_headers(headers)), job_id)
    click.echo(f"job {job_id}: {'stop requested' if stopped else 'had already ended'}")
