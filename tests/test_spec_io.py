"""Hardening: the loader never fails any other way than SpecError, infeasible or unwritable
runs are refused before launch, a crash never leaves a half promoted model, corrupted or
malicious files are refused, secrets are redacted, and many trials keep the driver flat."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_spec, write_tiny_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytune_ft import spec as spec_mod
from raytune_ft.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from raytune_ft.spec import Spec, SpecError, check_fit, redact
from raytune_ft.spec_io import load_spec, parse_spec, spec_to_yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


# --------------------------------------------------------------------------------------------
# Property: anything fed to the loader gives a Spec or a SpecError (one line), never another
# exception. 200 examples per property; no example database written into the checkout.
# --------------------------------------------------------------------------------------------
PROPERTY = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _load_or_refuse(load: Any) -> Spec | SpecError:
    try:
        spec = load()
    except SpecError as e:
        assert "\n" not in str(e), str(e)  # one paragraph
        return e
    assert isinstance(spec, Spec)
    assert parse_spec(spec_to_yaml(spec)) == spec  # a valid spec round-trips
    return spec


@PROPERTY
@given(st.binary(max_size=600))
def test_any_bytes_give_a_spec_or_a_spec_error(tmp_path_factory: pytest.TempPathFactory,
                                               data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes", numbered=True) / "spec.yaml"
    path.write_bytes(data)
    _load_or_refuse(lambda: load_spec(path))


SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=12))
ANY_TREE = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.text(max_size=8) | st.integers(), kids, max_size=4),
                        max_leaves=25)


@PROPERTY
@given(st.dictionaries(st.text(max_size=10), ANY_TREE, max_size=6))
def test_any_mapping_gives_a_spec_or_a_spec_error(mapping: dict) -> None:
    _load_or_refuse(lambda: parse_spec(yaml.safe_dump(mapping), file="random.yaml"))


# Mappings spelt with the real field names and plausible values reach the deep validators
# (conditions, ranges against knobs, cross-section checks) that random keys never do.
FIELD_NAMES = sorted({n for m in [spec_mod.Spec, spec_mod.ModelSpec, spec_mod.DataSpec,
                                  spec_mod.TrainSpec, spec_mod.SearcherSpec,
                                  spec_mod.SchedulerSpec, spec_mod.RunSpec, spec_mod.Resources,
                                  spec_mod.PromoteSpec, spec_mod.Hyperparams,
                                  spec_mod.IntRange, spec_mod.Choice, spec_mod.Fixed]
                      for n in m.model_fields} | {"resources"})
WORDS = st.sampled_from(["sgd", "adam", "adamw", "relu", "none", "light", "asha", "tpe",
                         "choice", "uniform", "loguniform", "int", "fixed", "digits", "val_acc",
                         "resnet18", "t", "", "../x", "auto"])
VALUES = (st.integers(-3, 70) | st.floats(-2, 2) | st.sampled_from([1e-4, 0.5, 0.99, 1e9])
          | st.booleans() | st.none() | WORDS)
FIELD_TREE = st.recursive(VALUES, lambda kids: st.lists(kids, max_size=3)
                          | st.dictionaries(st.sampled_from(FIELD_NAMES), kids, max_size=5),
                          max_leaves=30)


@PROPERTY
@given(st.dictionaries(st.sampled_from(FIELD_NAMES), FIELD_TREE, max_size=8),
       st.booleans())
def test_mappings_of_real_field_names_give_a_spec_or_a_spec_error(mapping: dict,
                                                                  named: bool) -> None:
    if named:
        mapping = {"name": "t", **mapping}
    _load_or_refuse(lambda: parse_spec(yaml.safe_dump(mapping), file="fields.yaml"))


def test_found_by_the_properties() -> None:
    """What fuzzing the loader found, kept as plain cases."""
    bad = {
        "name: t\n? [a, b]\n: 1\n": "a key must be a plain word",           # was TypeError
        "name: t\nrun: {resources: {gpu: .inf}}\n": "finite number",          # OverflowError
        "name: t\nrun: {resources: {cpu: .nan}}\n": "finite number",          # passed as NaN
        "name: t\n" + "x: " + "[" * 200 + "]" * 200 + "\n": "nested deeper",  # RecursionError
    }
    for text, words in bad.items():
        with pytest.raises(SpecError, match=words):
            parse_spec(text)
    # `<<: *base` merges are plain YAML: allowed, and a merged key may be overridden.
    spec = parse_spec("name: t\nrun:\n  <<: {num_samples: 3, max_failures: 1}\n"
                      "  num_samples: 5\n")
    assert (spec.run.num_samples, spec.run.max_failures) == (5, 1)


# --------------------------------------------------------------------------------------------
# Before launch: resources, storage.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resources, cluster, fits", [
    ("{cpu: 1, gpu: 0}", {"CPU": 2.0}, 2),
    ("{cpu: 0.5, gpu: 0}", {"CPU": 2.0, "GPU": 0.0}, 4),
    ("{cpu: 1, gpu: 0.5}", {"CPU": 16.0, "GPU": 1.0}, 2),     # fractional GPUs pack trials
    ("{cpu: 4, gpu: 0.25}", {"CPU": 8.0, "GPU": 2.0}, 2),     # CPUs are the limit
    ("{cpu: 1, gpu: 0.1}", {"CPU": 8.0, "GPU": 0.3}, 3),      # no float rounding loss
    ("{cpu: 1, gpu: 2}", {"CPU": 8.0, "GPU": 4.0}, 2),
])
def test_check_fit_counts_trials_that_fit(resources: str, cluster: dict, fits: int) -> None:
    spec = parse_spec(f"name: t\nrun: {{resources: {resources}}}\n")
    assert check_fit(spec, cluster) == fits


@pytest.mark.parametrize("resources, cluster, words", [
    ("{cpu: 1, gpu: 1}", {"CPU": 2.0}, "1 CPU and 1 GPU, but the cluster has 2 CPU and 0 GPU "
                                       "(it has no GPU"),
    ("{cpu: 1, gpu: 2}", {"CPU": 8.0, "GPU": 1.0}, "allowed: cpu <= 8, gpu <= 1"),
    ("{cpu: 4}", {"CPU": 2.0, "GPU": 1.0}, "4 CPU and 0 GPU, but the cluster has 2 CPU"),
])
def test_check_fit_refuses_what_would_stay_pending(resources: str, cluster: dict,
                                                   words: str) -> None:
    spec = parse_spec(f"name: t\nrun:\n  resources: {resources}\n", file="s.yaml")
    with pytest.raises(SpecError) as info:
        check_fit(spec, cluster)
    assert info.value.field == "run.resources" and words in str(info.value)
    assert "pending forever" in str(info.value)


def test_storage_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raytune_ft import preflight

    preflight.check_writable(str(tmp_path / "new" / "runs"), "run.storage_path")  # created later
    preflight.check_writable("s3://bucket/runs", "run.storage_path")  # URIs: storage's business
    assert list(tmp_path.iterdir()) == []  # the probe left nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpecError, match="is a file") as info:
        preflight.check_writable(str(tmp_path / "f" / "runs"), "promote.dir")
    assert info.value.field == "promote.dir"
    with pytest.raises(SpecError, match="not writable"):
        preflight.check_writable("/sys/rtft-test", "run.storage_path")

    class Usage:
        free = 5 * 2**20

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(SpecError, match=r"the disk is full \(5 MB free"):
        preflight.check_writable(str(tmp_path), "run.storage_path")


def test_redact_hides_secret_values_keeps_names() -> None:
    env = {"env_vars": {"HF_TOKEN": "hf_abc", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "x",
                        "RAY_AUTH_TOKEN": "t", "WANDB_API_KEY": "k", "DB_PASSWORD": "p",
                        "PATH": "/usr/bin", "OMP_NUM_THREADS": "1"},
           "pip": ["raytune-ft"], "jobs": [{"my_secret": "s", "name": "n"}]}
    out = redact(env)
    assert out["env_vars"] == {"HF_TOKEN": "***", "AWS_SECRET_ACCESS_KEY": "***",
                               "AWS_REGION": "***", "RAY_AUTH_TOKEN": "***",
                               "WANDB_API_KEY": "***", "DB_PASSWORD": "***",
                               "PATH": "/usr/bin", "OMP_NUM_THREADS": "1"}
    assert out["pip"] == ["raytune-ft"] and out["jobs"] == [{"my_secret": "***", "name": "n"}]
    assert env["env_vars"]["HF_TOKEN"] == "hf_abc"  # a copy: the original is untouched
    assert "hf_abc" not in json.dumps(out)


# --------------------------------------------------------------------------------------------
# Nothing unsafe is loaded: a pickle that would run code.
# --------------------------------------------------------------------------------------------
class _Payload:
    marker = ""

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _evil_file(path: Path, marker: Path) -> Path:
    _Payload.marker = str(marker)
    torch.save({"model": _Payload(), "optimizer": {}, "epoch": 1}, path)
    return path


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = _evil_file(tmp_path / "evil.pth", marker)
    # The payload is live: an unsafe load would run it (the control).
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    from raytune_ft.models import load_state_file

    with pytest.raises(SpecError, match="cannot be loaded as plain tensors") as info:
        load_state_file(evil)  # model.weights
    assert info.value.field == "model.weights"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _evil_file(ckpt / "state.pt", marker)
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"cannot be read \(UnpicklingError: Weights only"):
        load_checkpoint(ckpt)  # a resume checkpoint
    assert not marker.exists()


def test_truncated_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "c", model={"w": torch.ones(64, 64)}, optimizer={},
                             scheduler={}, epoch=1, best=0.5, config={"a": 1})
    state = folder / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        load_checkpoint(folder)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Nothing lost: SIGKILL during promotion.
# --------------------------------------------------------------------------------------------
# The child promotes the same trial again and kills itself with SIGKILL at a fixed point: no
# sleeps, no races. "half": the weights are in the temporary folder, metrics.json not yet.
# "latest": the new version is renamed into place, LATEST not yet updated.
CHILD = r"""
import json, os, signal, sys
from raytune_ft import promote as P
from raytune_ft.data import prepare
from raytune_ft.spec_io import load_spec

spec_file, record_file, point = sys.argv[1:4]
spec = load_spec(spec_file)
record = P.TrialRecord(**json.loads(open(record_file).read()))

def die():
    print("dying", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

if point == "half":
    sha = P._sha256
    def _sha256(path):
        if path.parent.name.startswith(".tmp-"):
            die()
        return sha(path)
    P._sha256 = _sha256
else:
    replace = os.replace
    def _replace(src, dst):
        if str(dst).endswith("LATEST"):
            die()
        return replace(src, dst)
    os.replace = _replace
P.promote(spec, [record], prepare(spec.data), echo=print)
print("survived", flush=True)
"""

FILES = {"model.safetensors", "spec.yaml", "config.json", "metrics.json", "MODEL_CARD.md"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """A tiny trained trial: (root, spec, TrialRecord)."""
    import shutil

    from raytune_ft.data import prepare
    from raytune_ft.promote import TrialRecord
    from raytune_ft.spec import Hyperparams
    from raytune_ft.train import train

    root = tmp_path_factory.mktemp("promote")
    spec = tiny_spec(root)
    history: list = []

    def report(m: dict, folder: Path | None) -> None:
        history.append(m)
        shutil.copytree(folder, root / "ckpt", dirs_exist_ok=True)

    train(Hyperparams(batch_size=32, augment="none"), spec=spec, data=prepare(spec.data),
          report=report)
    return root, spec, TrialRecord("t1", {"batch_size": 32}, history, str(root / "ckpt"))


def _versions(models: Path) -> dict[str, set[str]]:
    return {p.name: {f.name for f in p.iterdir()} for p in models.glob("v*")}


def test_sigkill_during_promotion_leaves_old_or_new_never_half(trained) -> None:  # noqa: ANN001
    from raytune_ft.data import prepare
    from raytune_ft.promote import PromotedModelError, load_promoted, promote

    root, spec, record = trained
    models = Path(spec.promote.dir) / spec.name
    [v1] = promote(spec, [record], prepare(spec.data), echo=lambda s: None)
    spec_file = root / "spec.yaml"
    spec_file.write_text(spec_to_yaml(spec))
    record_file = root / "record.json"
    record_file.write_text(json.dumps(record.__dict__, default=str))

    for point, versions, latest in [("half", {"v1"}, "v1"), ("latest", {"v1", "v2"}, "v1")]:
        child = subprocess.run([sys.executable, "-c", CHILD, str(spec_file), str(record_file),
                                point], capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
        assert "dying" in child.stdout and "survived" not in child.stdout
        found = _versions(models)
        assert set(found) == versions, found
        assert all(files == FILES for files in found.values()), found  # whole folders only
        assert (models / "LATEST").read_text().strip() == latest  # never torn
        for v in found:
            load_promoted(models / v)  # every version there loads, sha256 checked
        if point == "half":  # the kill did land mid-write: a half temp folder is left
            [half] = models.glob(".tmp-*")
            written = {f.name for f in half.iterdir()}
            assert "model.safetensors" in written and "metrics.json" not in written, written

    # A later promotion works, cleans the dead one's temp folder, and moves LATEST on.
    [v3] = promote(spec, [record], prepare(spec.data), echo=lambda s: None)
    assert v3.name == "v3" and (models / "LATEST").read_text().strip() == "v3"
    assert not list(models.glob(".tmp-*"))
    # Corrupted promoted weights are refused with a clear error.
    weights = v1 / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(PromotedModelError, match="sha256 does not match"):
        load_promoted(v1)


# --------------------------------------------------------------------------------------------
# Nothing lost: a trial whose checkpoint is truncated fails cleanly; the search goes on.
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_truncated_trial_checkpoint_fails_that_trial_only(tmp_path: Path) -> None:
    # The search runs in its own process, with tests/plugins/faults on PYTHONPATH: its
    # sitecustomize wraps the trainable's report seam (nothing of this is in raytune_ft), and
    # the Ray workers of the Ray that process starts inherit the environment.
    spec_file = write_tiny_spec(tmp_path, n=2)
    faults = tmp_path / "faults"
    faults.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "raytune_ft.cli", "search", str(spec_file), "--quiet",
         "--set", "run.max_failures=1", "--set", "scheduler.type=none",
         "--set", "search.freeze_depth=0"],
        capture_output=True, text=True, env={**ENV, "RTFT_TEST_FAULTS": str(faults),
                                               "PYTHONPATH": os.pathsep.join(
                                                   [str(ROOT / "tests" / "plugins" / "faults"),
                                                    ENV["PYTHONPATH"]])},
        cwd=ROOT, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "promoted model:" in proc.stdout
    victim = (faults / "victim").read_text()
    trials = {t["trial_id"]: t for t in
              json.loads((tmp_path / "runs" / "tiny" / "trials.json").read_text())}
    assert len(trials) == 2 and victim in trials
    error = trials[victim]["error"] or ""
    # Not the injected crash: the retry resumed from the truncated checkpoint and said so.
    assert "CheckpointError" in error and "cannot be read" in error, error
    others = [t for tid, t in trials.items() if tid != victim]
    assert all(t["error"] is None and max(h["epoch"] for h in t["history"]) == 2
               for t in others), others


def test_results_read_a_current_trials_json_and_ignore_a_stale_one(tmp_path: Path) -> None:
    from raytune_ft.promote import TrialRecord
    from raytune_ft.runs import records_from_json

    run = tmp_path / "run"
    (run / "tune").mkdir(parents=True)
    state = run / "tune" / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text("{}")
    rec = TrialRecord("a1", {"lr": 0.1}, [{"epoch": 1, "val_acc": 0.5, "diverged": False}],
                      "/ckpt", None)
    (run / "trials.json").write_text(json.dumps([rec.__dict__]))
    os.utime(state, (1e9, 1e9))  # Ray's state older than trials.json: the run is finished
    assert records_from_json(run) == [rec]
    os.utime(run / "trials.json", (1e9 - 5, 1e9 - 5))  # a resume ran since: read Ray's state
    assert records_from_json(run) is None


# --------------------------------------------------------------------------------------------
# Load: bench/load.py in smoke mode (the full run is `python bench/load.py --trials 200`).
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_load_bench_smoke(ray_session, tmp_path: Path) -> None:  # noqa: ANN001
    spec = importlib.util.spec_from_file_location("rtft_bench_load", ROOT / "bench" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    figures = load.main(["--smoke", "--root", str(tmp_path), "--out",
                         str(tmp_path / "load.json")])
    assert figures["records"] == 4 and figures["states"] == {"ok": 4}
    assert figures["promoted"] == 1
    assert figures["results_first_line"] == "4 trials: 4 completed"
    marks = [m["trials"] for m in figures["memory_mb"]]
    assert marks == [4, "after promotion"]
    assert all(m["VmHWM"] >= m["VmRSS"] > 0 for m in figures["memory_mb"])
    assert json.loads((tmp_path / "load.json").read_text())["trials"] == 4
