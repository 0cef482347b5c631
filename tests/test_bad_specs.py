"""Every broken spec in tests/bad_specs/ is refused the way a user needs it refused.

Each corpus file starts with comment lines that say what it must produce:

    # <what is wrong, in words>.
    # field: run.num_samples         the field the error names (absent: none is checked)
    # expect: greater than or equal to 1   a fragment the message holds (repeatable)
    # via: search                     the command that refuses it (default: validate)
    # setup: wrong_shapes             files or conditions the test builds first (see SETUPS)
    # line: 5                         the YAML line the error names (absent: no line)

The header is part of the file, so the line numbers count it. Every case: exit code 2, one
line on the output ("error: FILE, line N: field 'F': …"), no traceback, and nothing written
(the test runs in an empty folder, where the corpus' relative paths point).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from raytune_ft.cli import main

CORPUS = Path(__file__).resolve().parent / "bad_specs"


@dataclass(frozen=True)
class Case:
    path: Path
    field: str | None = None
    line: int | None = None
    expect: tuple[str, ...] = ()
    via: str = "validate"
    setup: str | None = None


def _read_case(path: Path) -> Case:
    head: dict[str, list[str]] = {}
    for raw in path.read_bytes().decode("latin-1").splitlines():
        if not raw.startswith("# "):
            break
        key, sep, value = raw[2:].partition(": ")
        if sep:
            head.setdefault(key, []).append(value)
    one = {k: v[0] for k, v in head.items()}
    return Case(path, field=one.get("field"), line=int(one["line"]) if "line" in one else None,
                expect=tuple(head.get("expect", [])), via=one.get("via", "validate"),
                setup=one.get("setup"))


CASES = [_read_case(p) for p in sorted(CORPUS.glob("*.yaml"))]
BY_NAME = {c.path.stem: c for c in CASES}


# -- what some cases need built first, in the test's empty working folder -------------------
def _one_class(root: Path, mp: pytest.MonkeyPatch) -> None:
    from PIL import Image

    folder = root / "one_class" / "cats"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")


def _wrong_shapes(root: Path, mp: pytest.MonkeyPatch) -> None:
    # Every key of a resnet18, every tensor the wrong shape: a small file, a real mismatch.
    import torchvision

    keys = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({k: torch.zeros(1) for k in keys}, root / "wrong_shapes.pth")


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {os.getcwd()}/PWNED",))


def _evil_pickle(root: Path, mp: pytest.MonkeyPatch) -> None:
    torch.save(_Evil(), root / "evil.pth")


def _no_gpu(root: Path, mp: pytest.MonkeyPatch) -> None:
    # A machine, or a Ray cluster, without GPUs, whatever this test machine has.
    import ray

    mp.setattr(torch.cuda, "device_count", lambda: 0)
    mp.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})


def _a_file(root: Path, mp: pytest.MonkeyPatch) -> None:
    (root / "a_file").write_text("not a folder\n")


SETUPS: dict[str, Callable[[Path, pytest.MonkeyPatch], None]] = {
    "one_class": _one_class, "wrong_shapes": _wrong_shapes, "evil_pickle": _evil_pickle,
    "no_gpu": _no_gpu, "a_file": _a_file,
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (the corpus' relative paths and default storage land here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # never join a cluster from here
    return tmp_path


def _refuse(case: Case, workdir: Path, monkeypatch: pytest.MonkeyPatch, *,
            command: str | None = None, debug: bool = False) -> str:
    if case.setup:
        SETUPS[case.setup](workdir, monkeypatch)
    before = sorted(workdir.rglob("*"))
    args = [command or case.via, str(case.path), *(["--debug"] if debug else [])]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert sorted(workdir.rglob("*")) == before, "something was written"
    return res.output


def test_the_corpus_is_big_and_covers_every_command() -> None:
    assert len(CASES) >= 35
    assert {c.via for c in CASES} == {"validate", "search"}
    assert all(c.expect for c in CASES), [c.path.name for c in CASES if not c.expect]
    assert all(c.setup in SETUPS for c in CASES if c.setup)


@pytest.mark.parametrize("case", CASES, ids=[c.path.stem for c in CASES])
def test_bad_spec_is_refused_in_one_paragraph(case: Case, workdir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = _refuse(case, workdir, monkeypatch)
    assert "Traceback" not in out
    assert out.count("\n") == 1, out  # one paragraph, one line
    where = f"{case.path}, line {case.line}:" if case.line else f"{case.path}:"
    assert out.startswith(f"error: {where}"), out
    if case.field:
        assert f" field '{case.field}': " in out, out
    for fragment in case.expect:
        assert fragment in out, f"{fragment!r} not in {out!r}"
    assert not (workdir / "PWNED").exists()  # nothing in a spec or a weights file ran


# A few validate cases also go through `rtft search`: refused the same way before Ray starts.
@pytest.mark.parametrize("name", ["name_traversal", "num_samples_zero", "python_tag",
                                  "alias_bomb", "grace_gt_max_t"])
def test_search_refuses_what_validate_refuses(name: str, workdir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    case = BY_NAME[name]
    out = _refuse(case, workdir, monkeypatch, command="search")
    assert out.count("\n") == 1 and "Traceback" not in out
    assert all(fragment in out for fragment in case.expect), out


@pytest.mark.parametrize("name", ["yaml_syntax", "num_samples_zero", "missing_weights"])
def test_debug_shows_the_traceback(name: str, workdir: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    case = BY_NAME[name]
    out = _refuse(case, workdir, monkeypatch, debug=True)
    assert "Traceback (most recent call last)" in out
    assert out.rstrip().splitlines()[-1].startswith(f"error: {case.path}")


def test_the_corpus_specs_are_otherwise_sound(workdir: Path) -> None:
    """The `search` cases are refused for their one flaw only: `validate` accepts them (all
    but the GPU case, which `validate` also checks against this machine when it has no GPU)."""
    for case in CASES:
        if case.via == "search" and case.setup != "no_gpu":
            res = CliRunner().invoke(main, ["validate", str(case.path)])
            assert res.exit_code == 0, (case.path.name, res.output)

