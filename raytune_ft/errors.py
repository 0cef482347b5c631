"""The one error type rtft shows its users: a single paragraph naming file, line and field
where there are such (a spec), else just what went wrong (a cluster, the Jobs API).

This module imports nothing of ours at module level (and nothing outside the standard
library), so any module may raise :class:`UserError` without pulling in pydantic, YAML or torch.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["JobsError", "SpecError", "TrialOOMError", "UserError", "first_line"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UserError(ValueError):
    """Input the tool refuses (a spec, a `--set`, a weights file, a data folder, a cluster):
    one paragraph naming the file, the YAML line and the field where they are known, then what
    is wrong and what is allowed.

    The CLI prints ``str(error)`` alone (the traceback, with the chained cause, only with
    ``--debug``), so the message must stand on its own.
    """

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.field = field
        self.line = line
        super().__init__(str(self))

    def located(self, file: str | Path) -> UserError:
        """This error attributed to spec `file` (when it names no file yet). The YAML line of
        its field is added by :func:`raytune_ft.spec.yaml_io.locate`, which reads the file."""
        if self.file is None:
            self.file = str(file)
        return self

    def __str__(self) -> str:
        if self.file is None and self.field is None:
            # Not about a spec (an unreachable cluster, say): a "<spec>:" prefix would mislead.
            text = self.message
        else:
            where = self.file or "<spec>"
            if self.line is not None:
                where += f", line {self.line}"
            field = f" field '{self.field}':" if self.field else ""
            text = f"{where}:{field} {self.message}"
        # One paragraph whatever the spec holds: a key or value with a newline or another
        # control character is shown escaped (as Python writes it), never as a line break.
        return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


# The name every module and test has used so far; the same class, not a subclass, so
# `except SpecError` and `except UserError` catch exactly the same errors.
SpecError = UserError


class JobsError(UserError, RuntimeError):
    """The Ray Jobs API could not do what was asked (unreachable, refused, unknown job), or a
    `--header`/`--env` for it is malformed.

    A :class:`UserError`, so the CLI's one guard shows it; still a RuntimeError, as it was
    before it joined them, for callers that catch that.
    """

    def located(self, file: str | Path) -> JobsError:
        """Unchanged: a Jobs API failure is about the cluster or the command line, never a
        line of the spec file the command was given."""
        return self


def first_line(e: BaseException) -> str:
    """The first line of `e`'s message (surrounding blank lines dropped), else its type name.

    For a cause quoted inside one of our one-paragraph messages: torch's refusal of a pickle
    or Ray's connection error runs to a page, and only its first line says what happened.
    """
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class TrialOOMError(RuntimeError):
    """CUDA ran out of memory in a trial; the message names the batch size.

    Raised in the trial's worker (search/trainable.py); a trial's recorded error is Ray's text
    of it, which starts with this class's name: `runs.trial_state` reads "oom" from that."""
