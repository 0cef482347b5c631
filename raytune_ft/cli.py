"""`rtft`: the command line. The only module that imports Click.

Bad input (a spec, a path, weights) ends with one paragraph on stderr and exit code 2; add
`--debug` to see the traceback.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from raytune_ft.errors import UserError

if TYPE_CHECKING:  # pydantic and the schema load only for commands that read a spec:
    # `rtft --help` answers at once (tests/test_layout.py guards what importing cli loads)
    from raytune_ft.spec import Spec

EXIT_BAD_INPUT = 2


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our input errors into one paragraph and exit code 2 (traceback with --debug)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if kwargs.get("spec_file") is not None:
                e.located(kwargs["spec_file"])
            if debug:
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
    return wrapper


def _spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a spec field (dotted key), e.g. --set run.num_samples=4. "
                           "Repeatable.")(fn)
    fn = click.option("--debug", is_flag=True, help="Show tracebacks.")(fn)
    return click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="raytune-ft")
def main() -> None:
    """rtft — hyperparameter search for fine-tuning pretrained image models on Ray Tune.

    \b
    Quick start (offline, ~5 minutes on 2 CPU cores):
      rtft validate search_spaces/resnet.yaml
      rtft search   search_spaces/resnet.yaml
    """


def load_spec(path: Path, overrides: tuple[str, ...] = ()) -> Spec:
    from raytune_ft.spec_io import load_spec as load

    return load(path, overrides)


def _finish(outcome: Any) -> None:
    click.echo(f"done in {outcome.wall_s:.0f}s; results in {outcome.run_dir}")
    for p in outcome.promoted:
        click.echo(f"promoted model: {p}")
    if not outcome.promoted:
        sys.exit(1)  # the search ran, but produced no model: say so to scripts and CI


@main.command()
@_spec_options
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="Ray cluster to join: auto, head:6379 (from a cluster node), "
                   "ray://head:10001 (Ray Client), or http://head:8265 (runs the search as a "
                   "Ray job and follows it, like `rtft submit --wait`); default: a local Ray.")
@click.option("--quiet", is_flag=True, help="Only one line per finished trial.")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run of this spec (same name and storage).")
@_guard
def search(spec_file: Path, overrides: tuple[str, ...], debug: bool, address: str | None,
           quiet: bool, resume: bool) -> None:
    """Run the search in SPEC_FILE and promote the best trial.

    \b
    Examples:
      rtft search search_spaces/resnet.yaml
      rtft search search_spaces/resnet.yaml --set run.num_samples=4 --set train.max_epochs=2
      rtft search my.yaml --address auto          # on an existing Ray cluster
      rtft search my.yaml --resume                # continue after Ctrl-C, kill -9, reboot
    """
    if address and address.startswith(("http://", "https://")):
        # The dashboard's address is the Jobs API, which ray.init cannot join: the search runs
        # on the cluster as a Ray job instead, and this command follows it to the end.
        click.echo(f"{address} is a Ray Jobs API address: running this search there as a Ray "
                   f"job (same as `rtft submit --wait`)")
        extra = [*(["--quiet"] if quiet else []), *(["--resume"] if resume else [])]
        _submit_and_exit(spec_file, address, overrides, wait=True, headers=(), env=(),
                         pip=(), ship_code=True, extra_args=extra)
    from raytune_ft.search import run_search

    spec = load_spec(spec_file, overrides)
    _finish(run_search(spec, address=address, echo=click.echo, quiet=quiet, resume=resume))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--address", envvar="RAY_ADDRESS", default=None, help="Ray cluster to join.")
@click.option("--quiet", is_flag=True, help="Only one line per finished trial.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def resume(run_dir: Path, address: str | None, quiet: bool, debug: bool) -> None:
    """Continue the interrupted search in RUN_DIR with the spec saved there.

    \b
    Example:
      rtft resume rtft_runs/resnet18-digits
    """
    from raytune_ft.runs import where_it_is
    from raytune_ft.search import run_search

    spec = where_it_is(load_spec(run_dir / "spec.yaml"), run_dir)
    _finish(run_search(spec, address=address, echo=click.echo, quiet=quiet, resume=True))


@main.command()
@_spec_options
@click.option("--cluster-gpus", type=click.FloatRange(min=0), default=None, metavar="N",
              help="Say how many trials fit at once on a cluster with N GPUs in total.")
@click.option("--cluster-cpus", type=click.FloatRange(min=0), default=None, metavar="N",
              help="... and N CPUs (not counted when only --cluster-gpus is given).")
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="Read the resources of this Ray cluster instead (as `rtft search` would "
                   "join it; also $RAY_ADDRESS): auto, host:6379, "
                   "ray://host:10001, or http://head:8265 (token from RAY_AUTH_* or --header).")
@click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="HTTP header for an http:// --address (e.g. Authorization). Never printed.")
@_guard
def validate(spec_file: Path, overrides: tuple[str, ...], debug: bool,
             cluster_gpus: float | None, cluster_cpus: float | None, address: str | None,
             headers: tuple[str, ...]) -> None:
    """Dry-run the search in SPEC_FILE: every check `rtft search` makes before it starts Ray
    (the spec, where results go, the data folders, the weights, the model, how many trials
    fit), writing and downloading nothing. Prints the resolved spec, the search space, the ASHA
    rung plan, the model's stages and how many trials fit at once (on this machine, a given
    cluster size, or --address).

    \b
    Examples:
      rtft validate search_spaces/resnet.yaml --set scheduler.reduction_factor=3
      rtft validate search_spaces/resnet.yaml --set run.resources.gpu=0.5 --cluster-gpus 8
      rtft validate search_spaces/resnet.yaml --address http://127.0.0.1:8265
    """
    from raytune_ft import preflight
    from raytune_ft.space import rung_plan
    from raytune_ft.spec_io import spec_to_yaml

    spec = load_spec(spec_file, overrides)
    on = preflight.machines(spec, gpus=cluster_gpus, cpus=cluster_cpus, address=address,
                            headers=headers)
    plan = preflight.dry_run(spec, on)
    click.echo(f"# {spec_file}: valid\n")
    click.echo(spec_to_yaml(spec))
    click.echo(_space_table(spec))
    click.echo("\nASHA rung plan (epoch: trials expected to reach it):"
               if spec.scheduler.type == "asha" else "\nNo early stopping:")
    for epoch, n in rung_plan(spec):
        click.echo(f"  epoch {epoch:>4}: {n:>4} trial(s)")
    click.echo(f"\ndata:    {plan.data}\nweights: {plan.weights}")
    click.echo("\n" + plan.model.table())
    if plan.fit is not None:
        click.echo("\n" + plan.fit.line(spec))


def _space_table(spec: Spec) -> str:
    lines = ["search space:"]
    for name, p in spec.search.items():
        if p.space == "choice":
            dom = "{" + ", ".join(map(str, p.values)) + "}"
        elif p.space == "fixed":
            dom = f"= {p.value}"
        else:
            dom = f"[{p.low}, {p.high}]"
        cond = ("  when " + ", ".join(f"{k}={v}" for k, v in p.when.items())) if p.when else ""
        lines.append(f"  {name:<18} {p.space:<10} {dom}{cond}")
    return "\n".join(lines)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def promote(run_dir: Path, debug: bool) -> None:
    """Promote the best trial(s) of a finished run in RUN_DIR (again).

    \b
    Example:
      rtft promote rtft_runs/resnet18-digits
    """
    from raytune_ft.search import promote_again

    if not promote_again(run_dir, echo=click.echo):
        sys.exit(1)


@main.command()
@_spec_options
@_guard
def pretrain(spec_file: Path, overrides: tuple[str, ...], debug: bool) -> None:
    """Build (once) the `rtft:` backbone that SPEC_FILE's model.weights names.

    The backbone is cached under $RTFT_CACHE (default ~/.cache/rtft), keyed by its recipe;
    `rtft search` does this automatically on first use.
    """
    from raytune_ft.pretrain import ensure_backbone

    spec = load_spec(spec_file, overrides)
    path = ensure_backbone(spec, echo=click.echo)
    click.echo(f"backbone: {path}" if path else "model.weights is not an rtft: backbone; "
                                                 "nothing to do")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--promoted", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None, help="Promoted model folder to show (default: the latest).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def report(run_dir: Path, promoted: Path | None, debug: bool) -> None:
    """Write RUN_DIR/report/report.html: learning curves with the ASHA rungs, best so far vs
    wall time, parameter importances, the top trials, and every trial.

    \b
    Example:
      rtft report rtft_runs/resnet18-digits && xdg-open rtft_runs/resnet18-digits/report/report.html
    """
    from raytune_ft.report import write_report

    click.echo(f"report: {write_report(run_dir, promoted)}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--limit", default=20, show_default=True, help="Rows to show in the table.")
@click.option("--csv", "fmt", flag_value="csv", help="All trials as CSV on stdout.")
@click.option("--json", "fmt", flag_value="json", help="All trials as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def results(run_dir: Path, limit: int, fmt: str | None, debug: bool) -> None:
    """The trials of RUN_DIR sorted by best-so-far metric, with their state.

    \b
    Examples:
      rtft results rtft_runs/resnet18-digits
      rtft results rtft_runs/resnet18-digits --csv > trials.csv
    """
    from raytune_ft.runs import rung_summary, summary_rows, summary_table
    from raytune_ft.search import load_records

    spec = load_spec(run_dir / "spec.yaml")
    records = load_records(run_dir, spec)
    if fmt == "json":
        click.echo(json.dumps(summary_rows(records, spec), indent=1))
    elif fmt == "csv":
        rows = summary_rows(records, spec)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
    else:
        click.echo(f"{len(records)} trials: {rung_summary(records, spec)}")
        click.echo(summary_table(records, spec, limit=limit))


# --------------------------------------------------------------------------------------------
# Ray Jobs: rtft submit, rtft jobs list|status|logs|stop
# --------------------------------------------------------------------------------------------
def _jobs_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
                      help="HTTP header for the Jobs API, e.g. 'Authorization: Bearer <token>' "
                           "(repeatable; also $RTFT_JOB_HEADERS / $RAY_JOB_HEADERS as JSON). "
                           "Never printed.")(fn)
    return click.option("--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
                        default=None, help="The cluster's Jobs API, http://head:8265 "
                        "(also $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS).")(fn)


def _submit_and_exit(spec_file: Path, address: str | None, overrides: tuple[str, ...], *,
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


@main.command()
@_spec_options
@_jobs_options
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
@_guard
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
    _submit_and_exit(spec_file, address, overrides, wait=wait, headers=headers, env=env,
                     pip=pip, ship_code=ship_code)


@main.group()
def jobs() -> None:
    """Ray jobs on a cluster: list, status, logs, stop (see `rtft submit`)."""


@jobs.command("list")
@_jobs_options
@click.option("--json", "as_json", is_flag=True, help="All fields as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def jobs_list(address: str | None, headers: tuple[str, ...], as_json: bool, debug: bool) -> None:
    """The cluster's jobs, newest first."""
    from raytune_ft import jobs as j
    from raytune_ft.runs import text_table

    rows = j.list_jobs(j.client(address, j.parse_headers(headers)))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    body = [[r["submission_id"] or r["job_id"] or "-", r["status"],
             r["metadata"].get("rtft_spec", ""), r["entrypoint"][:60]] for r in rows]
    click.echo("\n".join(text_table(["job", "status", "spec", "entrypoint"], body)))


@jobs.command("status")
@click.argument("job_id")
@_jobs_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
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
@_jobs_options
@click.option("--follow", "-f", "follow", is_flag=True,
              help="Keep streaming until the job ends; exit with its status (0 succeeded).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
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
@_jobs_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def jobs_stop(job_id: str, address: str | None, headers: tuple[str, ...], debug: bool) -> None:
    """Stop the job (its trials end; finished ones stay in the run folder for --resume)."""
    from raytune_ft import jobs as j

    stopped = j.stop(j.client(address, j.parse_headers(headers)), job_id)
    click.echo(f"job {job_id}: {'stop requested' if stopped else 'had already ended'}")


if __name__ == "__main__":
    main()
