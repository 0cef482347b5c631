"""`rtft reproduce RUN_DIR TRIAL_ID`: train one trial again outside Ray and compare it, epoch by
epoch, with what it reported (:mod:`raytune_ft.reproduce`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from raytune_ft.cli.common import guard


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("trial_id")
@click.option("--rtol", type=click.FloatRange(min=0), default=None, metavar="R",
              help="Relative tolerance per figure. Default: 0 (equal to the last bit) for a "
                   "trial that ran on CPU in the environment it recorded (torch build, CPU "
                   "model and ISA, threads, ...); 1e-4 in another environment, one not "
                   "recorded, or on GPU.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guard
def reproduce(run_dir: Path, trial_id: str, rtol: float | None, debug: bool) -> None:
    """Train trial TRIAL_ID of the run in RUN_DIR again with the plain trainer (no Ray), for
    the epochs it ran, and compare train_loss, val_loss and val_acc epoch by epoch.

    The data is checked against the run's data.json first: data that changed is refused
    (exit code 2) naming what changed. Then the trial's recorded environment is compared with
    this one: the same (on CPU), the figures must be equal to the last bit; another one, or
    none recorded, they must agree within the tolerance, and the differences are listed.
    A distilled trial (model.teacher) is trained against its teacher's logits, recomputed
    as the search computed them from the teacher the run recorded (teacher.json): a teacher
    that is gone, or whose weights' sha256 changed, is refused (exit code 2).
    Exit code 0: every figure matches (within the stated tolerance); 1: one differs (the
    first is named).

    \b
    Example:
      rtft results rtft_runs/resnet18-digits          # trial ids
      rtft reproduce rtft_runs/resnet18-digits 3f2a9c1e
    """
    from raytune_ft.distill import reproduction_teacher
    from raytune_ft.reproduce import reproduce as run

    outcome = run(run_dir, trial_id, rtol=rtol, echo=click.echo, teacher=reproduction_teacher)
    click.echo("")
    click.echo("\n".join(outcome.table()))
    click.echo(outcome.verdict())
    if not outcome.matched:
        sys.exit(1)
