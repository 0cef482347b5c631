"""Opening a run folder wherever it now is: its spec re-rooted there, its files checked. Ray-free.

A run folder travels: copied from a cluster's shared storage to a laptop, renamed with its
project, restored from a backup. Everything that opens an existing run (`rtft resume`,
`results`, `report`, `promote`, `reproduce`, `export`) goes through :func:`open_run`, so that

- the paths the run's spec names are taken at the folder's current location
  (:func:`where_it_is`): `run.storage_path` is the folder's parent, and `promote.dir`, when it
  sat beside the runs (`./rtft_runs` and `./models` of one project), sits beside them again;
- a folder whose files were edited or partly copied is refused before anything is written,
  with one line naming the file and what is wrong (:func:`check_records`, and on a resume
  :func:`check_resumable`).

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
from raytune_ft.spec.schema import Spec
from raytune_ft.spec.yaml_io import load_spec

JOURNAL = "optuna.journal"
_CREATE_TRIAL = 4  # optuna.storages.journal's JournalOperation.CREATE_TRIAL


def open_run(run_dir: str | Path, *, resume: bool = False) -> Spec:
    """The spec of the run in `run_dir`, at the folder's current location, after checking its
    files (:func:`check_records`). Raises UserError naming the file at fault. `resume`: also
    refuse a folder renamed since (a resume looks for the run under its name). What a resume
    reads besides is checked by :func:`check_resumable` once the search knows the run exists
    (and, for an s3:// or gs:// run, has downloaded its files)."""
    run_dir = Path(run_dir)
    saved = run_dir / "spec.yaml"
    if not saved.is_file():
        raise UserError("file not found: the folder is not an rtft run folder; allowed: a "
                        "folder `rtft search` wrote (spec.yaml, trials.json, tune/)",
                        file=str(saved))
    spec = load_spec(saved)
    if resume and not is_uri(spec.run.storage_path) and run_dir.resolve().name != spec.name:
        # The run's folder is <storage>/<name>, and its Optuna study is named after it: a
        # renamed folder would be looked for (and resumed) under its old name.
        raise UserError(f"the run is named {spec.name!r} but its folder is "
                        f"{run_dir.resolve().name!r}; allowed: a run folder named as its run "
                        f"(rename the folder back to {spec.name!r})", file=str(saved),
                        field="name")
    check_records(run_dir)
    return where_it_is(spec, run_dir)


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
    if s.is_absolute() and common <= 2:  # "/" or "/home", "/mnt": not one project folder
        return None
    up = len(sp) - common  # how far the runs folder sits below the common folder
    if up < 1 or up > len(new_storage.parts) - 1:
        return None
    anchor = new_storage
    for _ in range(up):
        anchor = anchor.parent
    return anchor.joinpath(*mp[common:])


def check_records(run_dir: Path) -> None:
    """Refuse a `trials.json` that is not this run's: unreadable, or naming trials whose
    folders under `tune/` are missing while others are there."""
    tune = run_dir / TUNE_DIR
    trials_file = run_dir / "trials.json"
    if not trials_file.exists():
        return
    try:
        recorded = [(str(t["trial_id"]), bool(t.get("history")))
                    for t in json.loads(trials_file.read_text())]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"not a trials.json rtft wrote ({e}); copy it again from the run, or "
                        f"delete it (it is rewritten from tune/)", file=str(trials_file)) from e
    # Trial folders may all be gone (deleted to save space: trials.json and the checkpoints
    # promotion reads are what a finished run needs), and a trial that never started has
    # none; a trial that reported epochs and has no folder while others have theirs is a
    # sign of a file of another run, or of a partial copy.
    folders = {p.name.removeprefix("trial_") for p in tune.glob("trial_*")}
    strangers = [t for t, ran in recorded if ran and t not in folders]
    if folders and strangers:
        more = f" and {len(strangers) - 1} more" if len(strangers) > 1 else ""
        raise UserError(f"trial {strangers[0]}{more} has no folder {tune}/trial_"
                        f"{strangers[0]}: the file is from another run, or tune/ was partly "
                        f"copied", file=str(trials_file))


def check_resumable(run_dir: Path, *, tune_here: bool = True) -> None:
    """Refuse to resume a run whose files were partly copied or edited, before anything is
    written: Ray's experiment state missing from `tune/` (`tune_here`: tune/ is in `run_dir`,
    not at an s3:// / gs:// URI), an Optuna journal that is missing, corrupt or holds fewer
    trials than the run has."""
    tune = run_dir / TUNE_DIR
    if tune_here and not any(tune.glob("experiment_state*.json")):
        raise UserError("no Ray experiment state (experiment_state-*.json): a run folder "
                        "copied without it, or stopped before Ray's first snapshot, cannot be "
                        "resumed; `rtft results` and `rtft promote` read trials.json",
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
            except ValueError:
                op = None
            if not isinstance(op, dict):
                raise UserError(f"line {n} is not a journal entry (edited or corrupt); copy "
                                f"the file again from the run", file=str(journal))
            created += op.get("op_code") == _CREATE_TRIAL
    trials = [p.name.removeprefix("trial_") for p in tune.glob("trial_*") if p.is_dir()]
    if created < len(trials):
        raise UserError(f"the journal holds {created} trial(s), the run has {len(trials)}: "
                        f"it is truncated or from another run; copy it again from the run",
                        file=str(journal))
