"""What every `rtft` command shares: the input-error guard, the spec options, spec loading.
With cli.py and cli_jobs.py, the only modules that import Click.

Bad input (a spec, a path, weights) ends with one paragraph on stderr and exit code 2; add
`--debug` to see the traceback.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from raytune_ft.errors import UserError

if TYPE_CHECKING:  # pydantic and the schema load only for commands that read a spec:
    # `rtft --help` answers at once (tests/test_layout.py guards what importing cli loads)
    from raytune_ft.spec.schema import Spec

EXIT_BAD_INPUT = 2


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our input errors into one paragraph and exit code 2 (traceback with --debug)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if kwargs.get("spec_file") is not None:
                from raytune_ft.spec.yaml_io import locate  # reads the YAML, only on error

                locate(e, kwargs["spec_file"])
            if debug:
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
    return wrapper


def spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """SPEC_FILE, --set KEY=VALUE (repeatable) and --debug."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a spec field (dotted key), e.g. --set run.num_samples=4. "
                           "Repeatable.")(fn)
    fn = click.option("--debug", is_flag=True, help="Show tracebacks.")(fn)
    return click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))(fn)


def load_spec(path: Path, overrides: tuple[str, ...] = ()) -> Spec:
    """The spec in `path` with `overrides` applied (imports the schema on first use)."""
    from raytune_ft.spec.yaml_io import load_spec as load

    return load(path, overrides)
