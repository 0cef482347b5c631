"""No file under tests/fixtures names an absolute path that exists on the machine running the
tests. A fixture that does passes only where it was made (it happened: the 0.1.0 run folder
recorded /tmp/oldgen/..., and its test passed only on the machine that still had that folder).

Every file is read as bytes (pickles, torch zips and their members, event files alike) and
searched for paths under the places a machine keeps its own files. For each path found, the
deepest part of it that exists here must be one of those places itself (/tmp, /home, …): the
path names nothing this machine has. The same check as /work/shared/hooks/before-stop (2b).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Where a machine keeps its own files: absolute paths under these are what a fixture must not
# need. (Not /data, /usr, …: `archive/data/0` in every torch zip is no absolute path.)
ROOTS = ("/tmp", "/var/tmp", "/root", "/home", "/work", "/mnt", "/srv", "/scratch", "/Users",
         "/var/folders", "/private/tmp", "/private/var/folders")
# Existing here says nothing about the fixture: the roots, their parents, and Ray's default
# temporary folder (present wherever Ray ran; its sessions are named by time and pid).
GENERIC = {"/", "/var", "/private", "/private/var", "/tmp/ray", *ROOTS}


def absolute_paths(data: bytes, roots: tuple[str, ...] = ROOTS) -> set[str]:
    """The absolute paths under `roots` that `data` names, also inside the zip members or gzip
    stream it holds (a torch checkpoint is a zip; a member may be compressed). Matched
    anywhere, with nothing asked of the byte before: in a pickle that byte is the string's
    length, a letter for a path of 65 to 122 characters."""
    pattern = (rb"(?:" + b"|".join(re.escape(r.encode()) for r in roots)
               + rb")/[A-Za-z0-9._/=,+@~%-]*")
    found = {m.group().decode("ascii").rstrip("/.,") for m in re.finditer(pattern, data)}
    if data[:2] == b"\x1f\x8b":
        found |= absolute_paths(gzip.decompress(data), roots)
    elif data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                found |= absolute_paths(z.read(name), roots)
    return found


def existing_part(path: str) -> str:
    """The deepest ancestor of `path` (itself included) that exists on this machine."""
    p = path
    while p not in ("", "/") and not os.path.lexists(p):
        p = os.path.dirname(p)
    return p or "/"


def paths_of_this_machine(data: bytes, roots: tuple[str, ...] = ROOTS) -> list[tuple[str, str]]:
    """(path, the part of it that exists here) for each path `data` names that this machine
    has more of than a generic root."""
    return sorted({(p, existing_part(p)) for p in absolute_paths(data, roots)
                   if existing_part(p) not in GENERIC})


def _fixture_files() -> list[Path]:
    # __pycache__ is what Python writes when a test imports a fixture module: not a fixture.
    return sorted(p for p in FIXTURES.rglob("*")
                  if p.is_file() and "__pycache__" not in p.relative_to(FIXTURES).parts)


FILES = _fixture_files()


def test_there_are_fixtures_to_scan() -> None:
    assert len(FILES) >= 20, FILES


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(FIXTURES)) for p in FILES])
def test_a_fixture_names_no_path_of_this_machine(path: Path) -> None:
    here = paths_of_this_machine(path.read_bytes())
    assert not here, (
        f"{path.relative_to(FIXTURES)} names paths that exist on this machine (path, the part "
        f"that exists): {here[:5]}; a fresh machine lacks them: make the test that reads it "
        f"work without them (relocate, rewrite on copy), not the machine")


# -- the scan itself -------------------------------------------------------------------------
ABSENT = "/tmp/surely-absent-rtft-fixture-dir/runs/old-run"
LONG = (ABSENT + "/" + "y" * 100)[:100]  # pickled after its length byte: b"d"


def test_the_scan_sees_paths_in_text_pickles_zips_and_gzip() -> None:
    pickled = pickle.dumps({"dir": ABSENT, "long": LONG})
    assert b"\x8cd" + LONG.encode() in pickled  # the case a look-behind would miss
    assert {ABSENT, LONG} <= absolute_paths(pickled)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/data/0", b"\x00" * 8)
    in_zip = absolute_paths(buf.getvalue())
    assert {ABSENT, LONG} <= in_zip
    assert not any(p.startswith("/data") for p in in_zip)  # a zip's member names are not paths
    assert ABSENT in absolute_paths(gzip.compress(f'{{"path": "{ABSENT}"}}'.encode()))
    assert ABSENT in absolute_paths(f"storage_path: {ABSENT}\n".encode())


def test_a_path_that_exists_here_is_caught_and_one_that_does_not_is_not(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    gone = tmp_path / "kept" / "gone" / "file"
    data = pickle.dumps({"here": str(gone), "elsewhere": ABSENT})
    # tmp_path stands for a root here: wherever TMPDIR is, the check is the same.
    roots = (*ROOTS, str(tmp_path))
    assert paths_of_this_machine(data, roots) == [(str(gone), str(tmp_path / "kept"))]
    assert existing_part(ABSENT) in GENERIC  # /tmp exists everywhere: not a path of this one
    assert paths_of_this_machine(pickle.dumps(ABSENT)) == []


def test_the_old_run_folders_recorded_location_is_found_in_its_pickles() -> None:
    # The 0.1.0 fixture records where it was written inside Ray's pickles: the scan must see
    # it there (else a binary file could hide a path of this machine).
    found = absolute_paths((FIXTURES / "runs_v0.1.0" / "old-run" / "tune" / "tuner.pkl")
                           .read_bytes())
    assert any(p.startswith("/tmp/oldgen/runs/old-run") for p in found), found
