"""The Ray job's entrypoint (job_entry.py), without a cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raytune_ft.cli import job_entry


def test_job_entry_runs_rtft_in_a_private_copy(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The entrypoint copies the working dir and runs there: Ray may re-extract the original
    under the running driver (see job_entry.main)."""
    (tmp_path / "x.txt").write_text("here")
    monkeypatch.chdir(tmp_path)
    seen: dict[str, str] = {}

    def fake_main(args: list[str], prog_name: str, standalone_mode: bool) -> None:
        seen["cwd"] = os.getcwd()
        seen["x"] = Path("x.txt").read_text()
        seen["args"] = " ".join(args)
        raise SystemExit(3)

    monkeypatch.setattr("raytune_ft.cli.main.main", fake_main)
    assert job_entry.main(["search", "tiny.yaml"]) == 3
    assert seen["cwd"] != str(tmp_path) and seen["x"] == "here"
    assert seen["args"] == "search tiny.yaml"
    assert Path.cwd() == tmp_path and not Path(seen["cwd"]).exists()  # cleaned up
