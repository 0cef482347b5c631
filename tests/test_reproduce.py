"""`rtft reproduce`: a trial of a real (tiny) search trained again outside Ray matches what it
reported, figure for figure on CPU in the same environment, within a stated tolerance in
another one or an unknown one; changed data and unknown trials are refused (exit 2)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ROOT

from raytune_ft.cli.main import main
from raytune_ft.reproduce import compare, fingerprint_changes, first_difference, trial_device
from raytune_ft.spec.yaml_io import parse_spec

SPEC = """\
name: repro
model: {{arch: resnet18, weights: none}}
data: {{source: imagefolder, root: {root}/img, image_size: 16, val_fraction: 0.25, test_fraction: 0.25}}
train: {{max_epochs: 2, seed: 0}}
search:
  lr: {{space: loguniform, low: 1.0e-3, high: 1.0e-2}}
  optimizer: {{space: choice, values: [sgd, adamw]}}
  head_dropout: {{space: uniform, low: 0.0, high: 0.3}}
  batch_size: 8
  augment: light
searcher: {{sampler: tpe, seed: 0, n_startup_trials: 2}}
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
run: {{num_samples: 2, max_concurrent_trials: 2, storage_path: {root}/runs}}
promote: {{dir: {root}/models}}
"""


def _image_folder(root: Path) -> None:
    """3 classes × 16 noisy 16 px PNGs, each class tinted its own colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, tint in enumerate([(120, 0, 0), (0, 120, 0), (0, 0, 120)]):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(16):
            px = rng.integers(0, 135, (16, 16, 3)) + np.array(tint)
            Image.fromarray(px.astype("uint8")).save(root / f"c{c}" / f"{i}.png")


def _reproduce(run_dir: Path, trial_id: str, *args: str):  # noqa: ANN202
    return CliRunner().invoke(main, ["reproduce", str(run_dir), trial_id, *args],
                              catch_exceptions=False)


# --------------------------------------------------------------------------------------------
# Without a search
# --------------------------------------------------------------------------------------------
def _h(epoch: int, train_loss: float, val_loss: float, val_acc: float) -> dict:
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc}


def test_compare_names_the_first_differing_epoch_and_metric() -> None:
    recorded = [_h(1, 2.0, 1.5, 0.25), _h(2, 1.0, 1.25, 0.5), _h(3, 0.5, 1.0, 0.75)]
    same = [dict(h, lr=0.1) for h in recorded]  # other keys are not compared
    rows = compare(recorded, same)
    assert len(rows) == 9 and all(r.ok for r in rows) and first_difference(rows) is None

    off = [_h(1, 2.0, 1.5, 0.25), _h(2, 1.0, 1.25 + 1e-12, 0.5), _h(3, 0.5, 1.0, 0.5)]
    bad = first_difference(compare(recorded, off))
    assert (bad.epoch, bad.metric) == (2, "val_loss") and bad.diff == pytest.approx(1e-12)
    assert first_difference(compare(recorded, off, rtol=1e-9)).metric == "val_acc"
    # The reproduction stopped sooner (it diverged): the missing epoch differs.
    short = first_difference(compare(recorded, recorded[:2]))
    assert (short.epoch, short.metric, short.reproduced) == (3, "train_loss", None)


def test_fingerprint_changes_name_each_field() -> None:
    was = {"source": "imagefolder", "sha256": "aaaa", "train": 24, "train_per_class": [8, 8, 8],
           "classes": ["a", "b", "c"], "files": 48}
    assert fingerprint_changes(was, dict(was)) == []
    now = {**was, "sha256": "bbbb", "train_per_class": (8, 7, 8), "files": 47}
    changes = fingerprint_changes(was, now)
    assert [c.split(":")[0] for c in changes] == ["sha256", "train_per_class", "files"]
    assert changes[0].startswith('sha256: recorded "aaaa", now "bbbb" (hash of the pixels')


def test_trial_device_follows_the_trials_resources(tmp_path: Path) -> None:
    spec = parse_spec(SPEC.format(root=tmp_path), file="s.yaml")
    assert trial_device(spec) == "cpu"  # Ray hides GPUs from a trial that asks for none
    gpu = spec.model_copy(update={"run": spec.run.model_copy(update={
        "resources": spec.run.resources.model_copy(update={"gpu": 0.5})})})
    assert trial_device(gpu) == "cuda"


def test_unknown_trial_is_refused_listing_known_ids(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text((ROOT / "search_spaces" / "resnet.yaml").read_text())
    (run / "trials.json").write_text(json.dumps([
        {"trial_id": f"t{i}", "params": {}, "history": [{"epoch": 1, "val_acc": 0.5}]}
        for i in range(7)]))
    res = CliRunner().invoke(main, ["reproduce", str(run), "nope"])
    assert res.exit_code == 2, res.output
    assert "no trial 'nope'" in res.output and "t0, t1, t2, t3, t4, … (7 trials" in res.output


def test_the_recorded_environment_is_the_trials_own_else_the_runs(tmp_path: Path) -> None:
    """The trial's checkpoint first (its trainer wrote it); else the run's environment.json,
    unless Ray says the trial ran on another host than the search's (a cluster); else none."""
    from raytune_ft.reproduce import recorded_environment
    from raytune_ft.runs import TrialRecord

    run = tmp_path / "run"
    trial = run / "tune" / "trial_t1"
    (trial / "checkpoint_000000").mkdir(parents=True)
    (trial / "checkpoint_000000" / "config.json").write_text(json.dumps({"classes": []}))
    record = TrialRecord("t1", {}, [])
    env, why = recorded_environment(run, record)
    assert env is None and why.startswith("none recorded: no environment in the trial's")
    (run / "environment.json").write_text(json.dumps({"cpu": "A", "host": "head"}))
    # Where the trial ran is not known (an s3:// run's Ray files are not here): not the run's
    env, why = recorded_environment(run, record)
    assert env is None and "where the trial ran is not recorded here" in why
    (trial / "result.json").write_text(json.dumps({"epoch": 1, "hostname": "head"}) + "\n")
    assert recorded_environment(run, record)[0] == {"cpu": "A", "host": "head"}
    (trial / "result.json").write_text(json.dumps({"epoch": 1, "hostname": "worker-3"}) + "\n")
    env, why = recorded_environment(run, record)
    assert env is None and why == f"{run / 'environment.json'} is the search's, on head; " \
        "the trial ran on worker-3"
    (trial / "checkpoint_000001").mkdir()  # the latest checkpoint's, written by the trainer
    (trial / "checkpoint_000001" / "config.json").write_text(json.dumps({"environment": {
        "cpu": "B"}}))
    assert recorded_environment(run, record) == (
        {"cpu": "B"}, str(trial / "checkpoint_000001" / "config.json"))


def test_a_trial_of_an_old_run_folder_is_found_in_rays_folders() -> None:
    """rtft 0.1.0 runs have no trials.json: trials come from tune/trial_<id>/."""
    run = ROOT / "tests" / "fixtures" / "runs_v0.1.0" / "old-run"
    res = CliRunner().invoke(main, ["reproduce", str(run), "nope"])
    assert res.exit_code == 2 and "4d02f39d, 9294ffbd, c0368dca" in res.output, res.output


def _scale_recorded(result_json: Path, epoch: int, metric: str, factor: float) -> None:
    """Multiply one figure a trial folder recorded (Ray's result.json) by `factor`."""
    rows = [json.loads(ln) for ln in result_json.read_text().splitlines() if ln.strip()]
    for row in rows:
        if row["epoch"] == epoch:
            row[metric] *= factor
    result_json.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_trials_of_rtft_0_1_0_reproduce_within_the_tolerance_of_an_unknown_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 0.1.0 fixture run (a tiny factory model) recorded no environment, and was made on
    another machine: CPU results are bit-equal on one machine only (train_loss differed by
    8e-8 relative on another CPU kind), so its trials are compared within rtol 1e-4, said so.
    The tolerance still bites: a figure recorded 1e-6 off passes, one 1e-3 off fails (exit 1).
    If a change to the trainer alters its figures on purpose, this is where it shows: old runs
    no longer reproduce. The trial killed before its first epoch has nothing to compare."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fixtures"))  # the model factory
    run = tmp_path / "old-run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "runs_v0.1.0" / "old-run", run)
    _scale_recorded(run / "tune" / "trial_9294ffbd" / "result.json", 1, "train_loss", 1 + 1e-6)
    _scale_recorded(run / "tune" / "trial_c0368dca" / "result.json", 1, "val_loss", 1 + 1e-3)

    res = _reproduce(run, "9294ffbd")
    assert res.exit_code == 0, res.output
    assert "2 of 2 epoch(s) on cpu" in res.output
    assert "environment: unknown (none recorded: no environment in the trial's checkpoints, " \
        "no environment.json" in res.output
    assert "comparing within rtol 0.0001 (relative, per figure)" in res.output
    assert "trial 9294ffbd reproduces on cpu, environment unknown: all 6 figures match " \
        "within rtol 0.0001 (" in res.output
    rows = {(ln.split()[0], ln.split()[1]): ln.split()[-1] for ln in res.output.splitlines()
            if re.match(r"\d+\s+(train|val)_", ln)}
    assert len(rows) == 6 and set(rows.values()) == {"match"}, res.output

    res = _reproduce(run, "c0368dca")  # ASHA stopped it after epoch 1
    assert res.exit_code == 1, res.output
    assert "1 of 2 epoch(s) on cpu" in res.output
    assert "trial c0368dca does not reproduce on cpu, environment unknown: first difference " \
        "at epoch 1, val_loss" in res.output and "required: within rtol 0.0001)" in res.output

    res = CliRunner().invoke(main, ["reproduce", str(run), "4d02f39d"])
    assert res.exit_code == 2 and "reported no epoch" in res.output, res.output


# --------------------------------------------------------------------------------------------
# A real search, then its trials again
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    root = tmp_path_factory.mktemp("reproduce")
    _image_folder(root / "img")
    spec_file = root / "repro.yaml"
    spec_file.write_text(SPEC.format(root=root))
    res = CliRunner().invoke(main, ["search", str(spec_file), "--quiet"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root / "runs" / "repro"


def _trials(run_dir: Path) -> dict[str, int]:
    """{trial id: epochs it ran}."""
    return {t["trial_id"]: max(h["epoch"] for h in t["history"])
            for t in json.loads((run_dir / "trials.json").read_text())}


@pytest.mark.slow
def test_every_trial_reproduces_exactly_in_the_same_environment(run_dir: Path) -> None:
    """A run made here: each trial's checkpoint records its environment, which is this one,
    so the figures must be equal to the last bit, and are."""
    trials = _trials(run_dir)
    assert len(trials) == 2
    for trial_id, epochs in trials.items():
        res = _reproduce(run_dir, trial_id)
        assert res.exit_code == 0, res.output
        assert re.search(r"environment: the same as recorded \(.*trial_" + trial_id
                         + r"/checkpoint_\d+/config\.json\): comparing exactly\n", res.output)
        rows = [ln for ln in res.output.splitlines() if re.match(r"\d+\s+(train|val)_", ln)]
        # Only the epochs the trial ran (ASHA may have stopped it at 1), three figures each.
        assert len(rows) == 3 * epochs, res.output
        assert all(ln.split()[-1] == "match" and ln.split()[-2] == "0" for ln in rows)
        assert f"trial {trial_id} reproduces on cpu, same environment: all {3 * epochs} " \
            "figures match exactly" in res.output


@pytest.mark.slow
def test_another_environment_is_named_and_compared_within_the_tolerance(run_dir: Path) -> None:
    """As if the trial had trained on another CPU with 4 threads: the differences are listed,
    the figures compared within rtol 1e-4 (here they are equal, so they agree)."""
    trial_id, epochs = min(_trials(run_dir).items(), key=lambda t: t[1])
    [config] = sorted((run_dir / "tune" / f"trial_{trial_id}").glob("checkpoint_*/config.json"))
    original = config.read_text()
    recorded = json.loads(original)
    env = recorded["environment"]
    recorded["environment"] = {**env, "cpu": "Other CPU 9000", "threads": 4,
                               "isa": [*(f for f in env["isa"] if f != "avx2"), "sve"]}
    try:
        config.write_text(json.dumps(recorded))
        res = _reproduce(run_dir, trial_id)
    finally:
        config.write_text(original)
    assert res.exit_code == 0, res.output
    assert f"environment: not the one recorded ({config}): comparing within rtol 0.0001 " \
        "(relative, per figure); it differs in\n" in res.output
    assert f"  cpu: Other CPU 9000 → {env['cpu']}\n" in res.output
    assert f"  threads: 4 → {env['threads']}\n" in res.output
    isa = "  isa: sve missing here" + ("; avx2 only here" if "avx2" in env["isa"] else "")
    assert isa + "\n" in res.output
    assert f"trial {trial_id} reproduces on cpu, other environment: all {3 * epochs} figures " \
        f"match within rtol 0.0001 ({3 * epochs} of them exactly)" in res.output


@pytest.mark.slow
def test_a_trial_stopped_early_is_stopped_there_and_a_difference_exits_1(run_dir: Path) -> None:
    """As if ASHA had stopped the trial after epoch 1 (and its val_loss were recorded one part
    in 10^12 off): one epoch is trained, with the schedule of train.max_epochs (2) — epoch 1's
    train_loss depends on it — and the command exits 1 naming epoch 1's val_loss."""
    path = run_dir / "trials.json"
    original = path.read_text()
    trials = json.loads(original)
    trial = trials[0]
    first = trial["history"][0]
    trial["history"] = [dict(first, val_loss=first["val_loss"] * (1 + 1e-12))]
    try:
        path.write_text(json.dumps(trials))
        res = _reproduce(run_dir, trial["trial_id"])
    finally:
        path.write_text(original)
    assert res.exit_code == 1, res.output
    assert "1 of 2 epoch(s) on cpu" in res.output and "epoch 2/" not in res.output
    rows = {ln.split()[1]: ln.split()[-1] for ln in res.output.splitlines()
            if re.match(r"1\s+(train|val)_", ln)}
    assert rows == {"train_loss": "match", "val_loss": "DIFFERS", "val_acc": "match"}, res.output
    assert f"trial {trial['trial_id']} does not reproduce on cpu, same environment: first " \
        "difference at epoch 1, val_loss" in res.output


@pytest.mark.slow
def test_changed_data_is_refused_before_training(run_dir: Path) -> None:
    image = run_dir.parents[1] / "img" / "c1" / "3.png"
    before, st = image.read_bytes(), image.stat()
    trial_id = next(iter(_trials(run_dir)))
    try:
        image.write_bytes(before + b"\0")  # one byte more: another size, another time
        res = CliRunner().invoke(main, ["reproduce", str(run_dir), trial_id])
    finally:
        image.write_bytes(before)
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert res.exit_code == 2, res.output
    assert "is not what the search trained on" in res.output
    assert "sha256: recorded" in res.output and "epoch 1/" not in res.output
