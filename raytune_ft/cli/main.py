"""`rtft`: the command line. The group and the commands of a search (search, resume,
validate, promote, pretrain, report, results); `rtft submit` and `rtft jobs` are in
:mod:`raytune_ft.cli.jobs`, what they share in :mod:`raytune_ft.cli.common`. Only the
modules of this package import Click.

Bad input (a spec, a path, weights) ends with one paragraph on stderr and exit code 2; add
`--debug` to see the traceback.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from raytune_ft.cli.common import guard, load_spec, spec_options
from raytune_ft.cli.export import export
from raytune_ft.cli.jobs import jobs, submit, submit_and_exit
from raytune_ft.cli.reproduce import reproduce

if TYPE_CHECKING:
    from raytune_ft.spec.schema import Spec


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="raytune-ft")
def main() -> None:
    """rtft — hyperparameter search for fine-tuning pretrained image models on Ray Tune.

    \b
    Quick start (offline, a few minutes on 2 CPU cores; see README.md):
      rtft validate search_spaces/resnet.yaml
      rtft search   search_spaces/resnet.yaml
    """


def _finish(wall_s: float, run_dir: Path, promoted: Sequence[Path]) -> None:
    click.echo(f"done in {wall_s:.0f}s; results in {run_dir}")
    for p in promoted:
        click.echo(f"promoted model: {p}")
    if not promoted:
        sys.exit(1)  # the search ran, but produced no model: say so to scripts and CI


@main.command()
@spec_options
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="Ray cluster to join: auto, head:6379 (from a cluster node), "
                   "ray://head:10001 (Ray Client), or http://head:8265 (runs the search as a "
                   "Ray job and follows it, like `rtft submit --wait`); default: a local Ray.")
@click.option("--quiet", is_flag=True, help="Only one line per finished trial.")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run of this spec (same name and storage).")
@guard
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
        submit_and_exit(spec_file, address, overrides, wait=True, headers=(), env=(),
                         pip=(), ship_code=True, extra_args=extra)
    from raytune_ft.api import search as run

    done = run(spec_file, overrides=overrides, address=address, resume=resume,
               echo=click.echo, quiet=quiet)
    _finish(done.wall_s, done.run_dir, done.model_dirs)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--address", envvar="RAY_ADDRESS", default=None, help="Ray cluster to join.")
@click.option("--quiet", is_flag=True, help="Only one line per finished trial.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guard
def resume(run_dir: Path, address: str | None, quiet: bool, debug: bool) -> None:
    """Continue the interrupted search in RUN_DIR with the spec saved there.

    \b
    Example:
      rtft resume rtft_runs/resnet18-digits
    """
    from raytune_ft.run_folder import open_run
    from raytune_ft.search.run import run_search

    spec = open_run(run_dir, resume=True)
    done = run_search(spec, address=address, echo=click.echo, quiet=quiet, resume=True)
    _finish(done.wall_s, done.run_dir, done.promoted)


@main.command()
@spec_options
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
@guard
def validate(spec_file: Path, overrides: tuple[str, ...], debug: bool,
             cluster_gpus: float | None, cluster_cpus: float | None, address: str | None,
             headers: tuple[str, ...]) -> None:
    """Dry-run the search in SPEC_FILE: every check `rtft search` makes before it starts Ray
    (the spec, where results go, the data folders, the weights, the model, how many trials
    fit), writing and downloading nothing. Prints the resolved spec, the search space, the ASHA
    rung plan, the portfolio as it will run, the model's stages and how many trials fit at
    once (on this machine, a given cluster size, or --address).

    \b
    Examples:
      rtft validate search_spaces/resnet.yaml --set scheduler.reduction_factor=3
      rtft validate search_spaces/resnet.yaml --set run.resources.gpu=0.5 --cluster-gpus 8
      rtft validate search_spaces/resnet.yaml --address http://127.0.0.1:8265
    """
    from raytune_ft.api import validate as dry_run
    from raytune_ft.spec.yaml_io import spec_to_yaml

    found = dry_run(spec_file, overrides, address, cluster_gpus=cluster_gpus,
                    cluster_cpus=cluster_cpus, headers=headers)
    spec = found.spec
    click.echo(f"# {spec_file}: valid\n")
    click.echo(spec_to_yaml(spec))
    click.echo(_space_table(spec))
    brackets = spec.scheduler.brackets if spec.scheduler.type == "asha" else 1
    if spec.scheduler.type != "asha":
        click.echo("\nNo early stopping:")
    elif brackets == 1:
        click.echo("\nASHA rung plan (epoch: trials expected to reach it):")
    else:
        click.echo(f"\nASHA rung plan, {brackets} brackets (trials take turns; epoch: trials "
                   f"expected to reach it):")
    for b, plan_b in enumerate(found.rungs):
        pad = "  " if brackets > 1 else ""
        if brackets > 1:
            click.echo(f"  bracket {b}" + (":" if len(plan_b) > 1 else
                                           " (stops nothing before max_t):"))
        for epoch, n in plan_b:
            click.echo(f"{pad}  epoch {epoch:>4}: {n:>4} trial(s)")
    if found.portfolio is not None:
        click.echo("\n" + "\n".join(found.portfolio))
    click.echo(f"\ndata:    {found.data}\nweights: {found.weights}")
    click.echo("\n" + "\n\n".join(m.table() for m in found.models))
    if found.fit is not None:
        click.echo("\n" + found.fit.line(spec))


def _space_table(spec: Spec) -> str:
    lines = ["search space:"]
    for name, p in spec.params.items():  # the architecture first when it is searched
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
@click.option("--pareto", is_flag=True,
              help="Promote every trial on the accuracy / latency-at-batch-1 Pareto front, "
                   "one version each, cheapest first (instead of the promote.top_k best).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guard
def promote(run_dir: Path, pareto: bool, debug: bool) -> None:
    """Promote the best trial(s) of a finished run in RUN_DIR (again), within the spec's
    promote.max_latency_ms / promote.max_params when it sets them.

    \b
    Examples:
      rtft promote rtft_runs/resnet18-digits
      rtft promote rtft_runs/which-model --pareto   # one version per point of the front
    """
    from raytune_ft.api import promote as promote_run

    promoted = promote_run(run_dir, pareto=pareto, echo=click.echo)
    if not promoted:
        sys.exit(1)


@main.command()
@spec_options
@guard
def pretrain(spec_file: Path, overrides: tuple[str, ...], debug: bool) -> None:
    """Build (once) the `rtft:` backbone(s) that SPEC_FILE's model.weights names (one per
    architecture of a model.arch choice).

    The backbone is cached under $RTFT_CACHE (default ~/.cache/rtft), keyed by its recipe;
    `rtft search` does this automatically on first use.
    """
    from raytune_ft.model.pretrain import ensure_backbone

    spec = load_spec(spec_file, overrides)
    paths = ensure_backbone(spec, echo=click.echo)
    for path in paths:
        click.echo(f"backbone: {path}")
    if not paths:
        click.echo("model.weights is not an rtft: backbone; nothing to do")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--promoted", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None, help="Promoted model folder to show (default: the latest).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guard
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
@guard
def results(run_dir: Path, limit: int, fmt: str | None, debug: bool) -> None:
    """The trials of RUN_DIR sorted by best-so-far metric, with their state.

    \b
    Examples:
      rtft results rtft_runs/resnet18-digits
      rtft results rtft_runs/resnet18-digits --csv > trials.csv
    """
    from raytune_ft.api import read_run
    from raytune_ft.tables import rung_summary, summary_rows, summary_table

    spec, records = read_run(run_dir)
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


main.add_command(submit)
main.add_command(jobs)
main.add_command(export)
main.add_command(reproduce)
