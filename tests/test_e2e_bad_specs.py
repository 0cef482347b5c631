"""Every broken spec in tests/bad_specs/ is refused the way a user needs it refused, by
`rtft validate` and by `rtft search` alike: validate is the search's dry run.

Each corpus file starts with comment lines that say what it must produce:

    # <what is wrong, in words>.
    # field: run.num_samples         the field the error names (absent: none is checked)
    # expect: greater than or equal to 1   a fragment the message holds (repeatable)
    # via: validate                   the commands that refuse it (default: validate search)
    # setup: wrong_shapes             files or conditions the test builds first (see SETUPS)
    # fix: model.weights=none         a --set that removes the one flaw (repeatable); needed
    #                                 where the spec itself loads and the dry run refuses it
    # line: 5                         the YAML line the error names (absent: no line)

The header is part of the file, so the line numbers count it. Every case: exit code 2, one
line on the output ("error: FILE, line N: field 'F': …"), no traceback, nothing written (the
test runs in an empty folder, where the corpus' relative paths point), and `rtft search` refuses
it before it starts Ray.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from raytune_ft.cli.main import main

CORPUS = Path(__file__).resolve().parent / "bad_specs"


@dataclass(frozen=True)
class Case:
    path: Path
    field: str | None = None
    line: int | None = None
    expect: tuple[str, ...] = ()
    via: tuple[str, ...] = ("validate", "search")
    setup: str | None = None
    fix: tuple[str, ...] = ()


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
                expect=tuple(head.get("expect", [])),
                via=tuple(one.get("via", "validate search").split()), setup=one.get("setup"),
                fix=tuple(head.get("fix", [])))


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


def _image_folders(root: Path, mp: pytest.MonkeyPatch) -> None:
    # good/: two classes with an image each; loose/: images but no class folder;
    # empty_class/: a class folder without any image.
    from PIL import Image

    for folder in ("good/cat", "good/dog", "loose", "empty_class/cat", "empty_class/dog"):
        (root / folder).mkdir(parents=True)
    for png in ("good/cat/0.png", "good/dog/0.png", "loose/0.png", "empty_class/cat/0.png"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(root / png)
    (root / "empty_class" / "dog" / "notes.txt").write_text("not an image\n")


def _bad_portfolio(root: Path, mp: pytest.MonkeyPatch) -> None:
    # searcher.portfolio: the third configuration's lr is past the knob's (0, 10].
    configs = [{"lr": 0.01}, {"lr": 0.003, "optimizer": "sgd"}, {"lr": 50.0}]
    (root / "bad_portfolio.json").write_text(json.dumps({"configs": configs}))


SETUPS: dict[str, Callable[[Path, pytest.MonkeyPatch], None]] = {
    "one_class": _one_class, "wrong_shapes": _wrong_shapes, "evil_pickle": _evil_pickle,
    "no_gpu": _no_gpu, "a_file": _a_file, "image_folders": _image_folders,
    "bad_portfolio": _bad_portfolio,
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (the corpus' relative paths and default storage land here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # never join a cluster from here
    return tmp_path


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _refuse(case: Case, workdir: Path, monkeypatch: pytest.MonkeyPatch, *,
            command: str = "validate", debug: bool = False) -> str:
    if case.setup:
        SETUPS[case.setup](workdir, monkeypatch)
    before = sorted(workdir.rglob("*"))
    ray_before = _ray_running()
    args = [command, str(case.path), *(["--debug"] if debug else [])]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert sorted(workdir.rglob("*")) == before, "something was written"
    assert _ray_running() == ray_before, "Ray was started"  # refused before launch
    return res.output


def test_the_corpus_is_big_and_covers_every_command() -> None:
    assert len(CASES) >= 45
    assert all(c.via == ("validate", "search") for c in CASES), \
        [c.path.name for c in CASES if c.via != ("validate", "search")]
    assert all(c.expect for c in CASES), [c.path.name for c in CASES if not c.expect]
    assert all(c.setup in SETUPS for c in CASES if c.setup)
    assert sum(bool(c.fix) for c in CASES) >= 15  # refused by the dry run, not by the schema


CASE_RUNS = [(c, cmd) for c in CASES for cmd in c.via]


@pytest.mark.parametrize("case, command", CASE_RUNS,
                         ids=[f"{c.path.stem}-{cmd}" for c, cmd in CASE_RUNS])
def test_bad_spec_is_refused_in_one_paragraph(case: Case, command: str, workdir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = _refuse(case, workdir, monkeypatch, command=command)
    assert "Traceback" not in out
    assert out.count("\n") == 1, out  # one paragraph, one line
    where = f"{case.path}, line {case.line}:" if case.line else f"{case.path}:"
    assert out.startswith(f"error: {where}"), out
    if case.field:
        assert f" field '{case.field}': " in out, out
    for fragment in case.expect:
        assert fragment in out, f"{fragment!r} not in {out!r}"
    assert not (workdir / "PWNED").exists()  # nothing in a spec or a weights file ran


@pytest.mark.parametrize("name, command", [
    ("yaml_syntax", "validate"), ("num_samples_zero", "search"),
    ("missing_weights", "validate"), ("weights_not_for_arch", "search"),
])
def test_debug_shows_the_traceback(name: str, command: str, workdir: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    case = BY_NAME[name]
    out = _refuse(case, workdir, monkeypatch, command=command, debug=True)
    assert "Traceback (most recent call last)" in out
    assert out.rstrip().splitlines()[-1].startswith(f"error: {case.path}")


def test_debug_shows_the_cause(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Refusals re-raised from another error keep it as their cause: --debug shows both.
    out = _refuse(BY_NAME["malicious_weights"], workdir, monkeypatch, debug=True)
    assert "The above exception was the direct cause of the following exception" in out


@pytest.mark.parametrize("case", CASES, ids=[c.path.stem for c in CASES])
def test_each_case_has_one_flaw(case: Case, workdir: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A case the schema accepts is refused by the dry run for its one flaw only: with its
    `fix:` the same spec validates, writing nothing. Every other case the schema refuses."""
    from raytune_ft.errors import UserError
    from raytune_ft.spec.yaml_io import load_spec

    if case.setup:
        SETUPS[case.setup](workdir, monkeypatch)
    if not case.fix:
        with pytest.raises(UserError):
            load_spec(case.path)
        return
    before = sorted(workdir.rglob("*"))
    args = ["validate", str(case.path), *(a for f in case.fix for a in ("--set", f))]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, (case.path.name, res.output)
    assert sorted(workdir.rglob("*")) == before, "validate wrote something"
