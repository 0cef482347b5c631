"""UserError and its kinds (errors.py): one paragraph, a location only when there is one."""

from __future__ import annotations

import pytest

from raytune_ft import jobs


def test_error_names_a_location_only_when_it_has_one() -> None:
    from raytune_ft.errors import UserError

    assert str(UserError("the cluster is gone")) == "the cluster is gone"
    assert str(UserError("bad", field="run.resources")) == "<spec>: field 'run.resources': bad"
    assert str(UserError("bad", file="a.yaml")) == "a.yaml: bad"
    assert str(UserError("two\nlines")) == "two\\nlines"  # still one paragraph


@pytest.mark.parametrize("message, first", [
    ("\n  boom\nsecond line\n", "boom"),
    ("one line", "one line"),
    ("", "KeyError"),
])
def test_first_line_of_an_exception(message: str, first: str) -> None:
    from raytune_ft.errors import first_line

    exc = KeyError() if not message else RuntimeError(message)
    assert first_line(exc) == first


def test_jobs_error_is_a_user_error_that_no_spec_file_locates() -> None:
    from raytune_ft.errors import UserError

    e = jobs.JobsError("cannot reach the Ray Jobs API at http://x:8265: refused")
    assert isinstance(e, UserError) and isinstance(e, RuntimeError)
    assert str(e.located("tiny.yaml")) == "cannot reach the Ray Jobs API at http://x:8265: refused"
    assert e.file is None and e.line is None
