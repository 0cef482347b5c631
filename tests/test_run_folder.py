"""Opening a run folder wherever it now is (`raytune_ft.run_folder`): the spec re-rooted there,
checkpoint paths of trials.json re-rooted, and folders edited or partly copied refused with one
line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import tiny_spec

from raytune_ft.cli.main import main
from raytune_ft.run_folder import _beside, check_resumable, open_run, where_it_is
from raytune_ft.runs import read_records
from raytune_ft.spec.yaml_io import spec_to_yaml

CREATE_STUDY = {"op_code": 0, "worker_id": "w", "study_name": "tiny", "directions": [2]}


def _trial_op(n: int) -> dict:
    return {"op_code": 4, "worker_id": "w", "study_id": 0, "datetime_start": None, "state": 0,
            "value": None, "values": None, "distributions": {}, "params": {},
            "user_attrs": {}, "system_attrs": {}, "intermediate_values": {}, "n": n}


def _run_folder(root: Path, *, trials: int = 2, journal_trials: int | None = None) -> Path:
    """A run folder as `rtft search` leaves it (the files open_run reads), written where the
    spec says it was, then moved to `root/moved/tiny`."""
    spec = tiny_spec(root)
    run = root / "moved" / "tiny"
    (run / "tune").mkdir(parents=True)
    (run / "spec.yaml").write_text(spec_to_yaml(spec))
    (run / "tune" / "experiment_state-2026.json").write_text("{}")
    (run / "tune" / "tuner.pkl").write_bytes(b"")  # never read: refused before the restore
    old_tune = root / "runs" / "tiny" / "tune"  # where it was written: recorded absolutely
    records = []
    for i in range(trials):
        (run / "tune" / f"trial_t{i}").mkdir()
        records.append({"trial_id": f"t{i}", "params": {"lr": 0.01},
                        "history": [{"epoch": 1, "val_acc": 0.5}],
                        "best_checkpoint": str(old_tune / f"trial_t{i}" / "checkpoint_000000"),
                        "error": None})
    (run / "trials.json").write_text(json.dumps(records))
    ops = [CREATE_STUDY] + [_trial_op(i) for i in range(
        trials if journal_trials is None else journal_trials)]
    (run / "optuna.journal").write_text("".join(json.dumps(o) + "\n" for o in ops))
    return run


def test_a_moved_run_is_opened_where_it_is(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    assert not (tmp_path / "runs").exists()
    spec = open_run(run)
    check_resumable(run)
    assert Path(spec.run.storage_path) == run.parent.resolve()
    # promote.dir sat beside the runs folder ({root}/runs, {root}/models): beside it again
    assert Path(spec.promote.dir) == (tmp_path / "models").resolve()
    records = read_records(run / "trials.json")
    assert [r.best_checkpoint for r in records] == [
        str(run.resolve() / "tune" / f"trial_t{i}" / "checkpoint_000000") for i in range(2)]


def test_a_run_opened_where_it_was_written_is_unchanged(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    assert where_it_is(spec, run) == spec


@pytest.mark.parametrize(("storage", "models", "new", "expected"), [
    ("/tmp/oldgen/runs", "/tmp/oldgen/models", "/x/y/runs", "/x/y/models"),
    ("./rtft_runs", "./models", "/home/u/p2/rtft_runs", "/home/u/p2/models"),
    ("rtft_runs", "out/models", "/home/u/p2/rtft_runs", "/home/u/p2/out/models"),
    ("/mnt/shared/a/runs", "/mnt/shared/models", "/h/p/x/runs", "/h/p/models"),
    ("/mnt/a/runs", "/data/models", "/x/runs", None),   # only / in common: a dedicated folder
    ("/home/u/runs", "/home/v/models", "/x/runs", None),  # a generic root only: not a project
    ("./runs", "/abs/models", "/x/runs", None),          # one relative, one absolute
    ("../runs", "../models", "/x/runs", None),           # above the start folder: unknown
])
def test_promote_dir_moves_with_the_runs_folder_when_they_were_siblings(
        storage: str, models: str, new: str, expected: str | None) -> None:
    got = _beside(storage, models, Path(new))
    assert (str(got) if got else None) == expected


def _resume(run: Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["resume", str(run)])
    return res.exit_code, res.output


def _snapshot(run: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}


@pytest.mark.parametrize(("damage", "expected"), [
    ("no_tune", "tune: no Ray experiment (tune/tuner.pkl): the run folder was partly copied"),
    ("no_state", "tune: no Ray experiment state (experiment_state-*.json)"),
    ("truncated_journal", "optuna.journal: the journal holds 1 trial(s), the run has 2"),
    ("corrupt_journal", "optuna.journal: line 2 is not a journal entry"),
    ("array_journal", "optuna.journal: line 2 is not a journal entry"),
    ("foreign_trials", "trials.json: trial zz has no folder"),
    ("renamed", "the run is named 'tiny' but its folder is 'tiny-copy'"),
    ("broken_trials", "trials.json: not a trials.json rtft wrote"),
    ("no_spec", "spec.yaml: file not found: the folder is not an rtft run folder"),
])
def test_a_damaged_run_folder_is_refused_in_one_line(tmp_path: Path, damage: str,
                                                     expected: str) -> None:
    run = _run_folder(tmp_path, journal_trials=1 if damage == "truncated_journal" else None)
    if damage == "no_tune":
        for p in sorted((run / "tune").rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (run / "tune").rmdir()
        (run / "trials.json").unlink()
    elif damage == "no_state":
        (run / "tune" / "experiment_state-2026.json").unlink()
    elif damage == "array_journal":
        lines = (run / "optuna.journal").read_text().splitlines(keepends=True)
        (run / "optuna.journal").write_text(lines[0] + "[1, 2]\n" + "".join(lines[2:]))
    elif damage == "renamed":
        run = run.rename(run.with_name("tiny-copy"))
    elif damage == "corrupt_journal":
        lines = (run / "optuna.journal").read_text().splitlines(keepends=True)
        (run / "optuna.journal").write_text(lines[0] + "{not json\n" + "".join(lines[2:]))
    elif damage == "foreign_trials":
        recs = json.loads((run / "trials.json").read_text())
        recs[0]["trial_id"] = "zz"
        (run / "trials.json").write_text(json.dumps(recs))
    elif damage == "broken_trials":
        (run / "trials.json").write_text('[{"trial_id": "t0", "histo')
    elif damage == "no_spec":
        (run / "spec.yaml").unlink()
    before = _snapshot(run)
    code, out = _resume(run)
    assert code == 2, out
    assert expected in out, out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out
    assert _snapshot(run) == before  # nothing written or overwritten
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


def test_a_journal_cut_short_by_a_crash_is_accepted(tmp_path: Path) -> None:
    """A last line without its newline is what a crash mid-write leaves: Optuna skips it."""
    run = _run_folder(tmp_path)
    with open(run / "optuna.journal", "a") as f:
        f.write('{"op_code": 4, "work')
    check_resumable(run)


def test_results_of_a_damaged_folder_name_the_file(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    recs = json.loads((run / "trials.json").read_text())
    recs.append({**recs[0], "trial_id": "other"})
    (run / "trials.json").write_text(json.dumps(recs))
    res = CliRunner().invoke(main, ["results", str(run)])
    assert res.exit_code == 2 and "trial other has no folder" in res.output
    assert os.fspath(run / "trials.json") in res.output
