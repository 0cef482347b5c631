"""Opening a run folder wherever it now is: its spec re-rooted there, its files checked. Ray-free.

A run folder travels: copied from a cluster's shared storage to a laptop, renamed with its
project, restored from a backup. Everything that opens an existing run (`rtft resume`,
`results`, `report`, `promote`, `reproduce`, `export`) goes through :func:`open_run`, so that

- the paths the run's spec names are taken at the folder's current location
  (:func:`where_it_is`): `run.storage_path` is the folder's parent, and `promote.dir`, when it
  sat beside the runs (`./rtft_runs` and `./models` of one project), sits beside them again;
- a folder whose files were edited or partly copied is refused before anything is written,
  with one line naming the file and what is wrong (:func:`check_run_folder`).

Paths inside Ray's and Optuna's own state (the scheduler's log folder, the journal, the
experiment new trials are made from) are re-rooted by the search when it resumes
(`search/run.py`); checkpoint paths in `trials.json` by :func:`raytune_ft.runs.read_records`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePath

from raytune_ft.errors import UserError
from raytune_ft.paths import is_uri
from raytune_ft.runs import TUNE_DIR
from raytune_ft.spec import Spec
from raytune_ft.spec_io import load_spec

JOURNAL = "optuna.journal"
_CREATE_TRIAL = 4  # optuna.storages.journal's JournalOperation.CREATE_TRIAL


def open_run(run_dir: str | Path, *, resume: bool = False) -> Spec:
    """The spec of the run in `run_dir`, at the folder's current location, after checking its
    files (`resume`: also what a resume reads). Raises UserError naming the file at fault."""
    run_dir = Path(run_dir)
    saved = run_dir / "spec.yaml"
    if not saved.is_file():
        raise UserError("file not found: the folder is not an rtft run folder; allowed: a "
                        "folder `rtft search` wrote (spec.yaml, trials.json, tune/)",
                        file=str(saved))
    spec = where_it_is(load_spec(saved), run_dir)
    check_run_folder(run_dir, resume=resume)
    return spec


def where_it_is(spec: Spec, run_dir: Path) -> Spec:
    """The run's own `spec`, opened at `run_dir`: a run folder that was moved (or is opened
    through another path) is read and resumed where it now is.

    `run.storage_path` becomes the folder's parent. `promote.dir` moves with it when it lay
    beside the run's storage in the spec (both relative, or both absolute below a common
    folder other than `/`): the same relative place from the storage's new parent; otherwise
    (a dedicated absolute models folder) it stays. With an s3:// or gs:// storage_path the
    folder is the staging copy and the spec stays as it is."""
    storage = spec.run.storage_path
    if is_uri(storage):
        return spec
    here = run_dir.resolve()
    if Path(storage).expanduser().resolve() / spec.name == here:
        return spec
    run = spec.run.model_copy(update={"storage_path": str(here.parent)})
    update = {"run": run}
    moved = _beside(storage, spec.promote.dir, here.parent)
    if moved is not None:
        update["promote"] = spec.promote.model_copy(update={"dir": str(moved)})
    return spec.model_copy(update=update)


def _beside(storage: str, models: str, new_storage: Path) -> Path | None:
    """Where `models` goes when the runs folder `storage` is now `new_storage`, if the two
    were siblings under one project folder (None: leave it as it is)."""
    s, m = PurePath(os.path.expanduser(storage)), PurePath(os.path.expanduser(models))
    if s.is_absolute() != m.is_absolute() or ".." in s.parts or ".." in m.parts:
        return None
    sp = [p for p in s.parts if p != "."]
    mp = [p for p in m.parts if p != "."]
    common = 0
    while common < min(len(sp), len(mp)) and sp[common] == mp[common]:
        common += 1
    if s.is_absolute() and common <= 1:  # only "/" in common: not one project folder
        return None
    up = len(sp) - common  # how far the runs folder sits below the common folder
    if up < 1 or up > len(new_storage.parts) - 1:
        return None
    anchor = new_storage
    for _ in range(up):
        anchor = anchor.parent
    return anchor.joinpath(*mp[common:])


def check_run_folder(run_dir: Path, *, resume: bool = False) -> None:
    """Refuse a run folder whose files were edited or partly copied, before anything reads
    further or writes: trials.json that is not this run's, and (`resume`) a missing `tune/`
    or an Optuna journal that is corrupt or holds fewer trials than the run has."""
    tune = run_dir / TUNE_DIR
    trials_file = run_dir / "trials.json"
    recorded: list[str] | None = None
    if trials_file.exists():
        try:
            recorded = [str(t["trial_id"]) for t in json.loads(trials_file.read_text())]
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"not a trials.json rtft wrote ({e}); copy it again from the "
                            f"run, or delete it (it is rewritten from tune/)",
                            file=str(trials_file)) from e
        # Trial folders may all be gone (deleted to save space: trials.json and the
        # checkpoints promotion reads are what a finished run needs); some gone is a sign of
        # a file of another run, or of a partial copy.
        folders = {p.name.removeprefix("trial_") for p in tune.glob("trial_*")}
        strangers = [t for t in recorded if t not in folders]
        if folders and strangers:
            raise UserError(f"trial {strangers[0]} (and {len(strangers) - 1} more) has no "
                            f"folder {tune}/trial_{strangers[0]}: the file is from another "
                            f"run, or tune/ was partly copied", file=str(trials_file))
    if not resume:
        return
    if not tune.is_dir() or not any(tune.glob("experiment_state*.json")):
        raise UserError("missing, or without Ray's experiment state "
                        "(experiment_state-*.json): a run folder copied without it cannot "
                        "be resumed; `rtft results` and `rtft promote` read trials.json",
                        file=str(tune))
    journal = run_dir / JOURNAL
    if not journal.exists():
        raise UserError("missing; the search's Optuna study cannot be resumed without it",
                        file=str(journal))
    created = 0
    with open(journal, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # a last line cut short by a crash: Optuna ignores it too
            try:
                op = json.loads(raw)
            except ValueError as e:
                raise UserError(f"line {n} is not a journal entry (edited or corrupt); "
                                f"copy the file again from the run",
                                file=str(journal)) from e
            created += op.get("op_code") == _CREATE_TRIAL
    trials = recorded if recorded is not None else [
        p.name.removeprefix("trial_") for p in tune.glob("trial_*") if p.is_dir()]
    if created < len(trials):
        raise UserError(f"holds {created} trials, the run has {len(trials)}: the journal is "
                        f"truncated or from another run; copy it again from the run",
                        file=str(journal))
