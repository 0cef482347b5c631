"""The one error type rtft shows its users: a single paragraph naming file, line and field.

This module imports nothing of ours at module level (and nothing outside the standard
library), so any module may raise :class:`UserError` without pulling in pydantic, YAML or torch.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["SpecError", "UserError"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UserError(ValueError):
    """Input the tool refuses (a spec, a `--set`, a weights file, a data folder): one paragraph
    naming the file, the YAML line and the field, then what is wrong and what is allowed.

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
        """This error attributed to spec `file`, with the YAML line of its field if known."""
        if self.file is None:
            self.file = str(file)
            if self.field and self.line is None:
                # Imported here: spec_io imports the schema, which imports this module.
                from raytune_ft.spec_io import field_line

                self.line = field_line(file, self.field)
        return self

    def __str__(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where += f", line {self.line}"
        field = f" field '{self.field}':" if self.field else ""
        # One paragraph whatever the spec holds: a key or value with a newline or another
        # control character is shown escaped (as Python writes it), never as a line break.
        return _CONTROL.sub(lambda m: repr(m.group())[1:-1], f"{where}:{field} {self.message}")


# The name every module and test has used so far; the same class, not a subclass, so
# `except SpecError` and `except UserError` catch exactly the same errors.
SpecError = UserError
