"""Promotion (promote.py): the model folder written and read back, and a SIGKILL mid-promotion
leaves the old version or the new one, never half of one. (Which trial is chosen: test_runs.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ENV, ROOT, tiny_spec

from raytune_ft.data import prepare
from raytune_ft.knobs import Hyperparams
from raytune_ft.promote import PromotedModelError, TrialRecord, load_promoted, promote
from raytune_ft.spec_io import spec_to_yaml
from raytune_ft.train import evaluate, train


def test_promote_writes_a_versioned_folder_that_reloads(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    data = prepare(spec.data)
    ckpt_root = tmp_path / "ckpt"
    history: list = []

    def report(m: dict, folder: Path | None) -> None:
        history.append(m)
        if folder is not None:  # the trial's last epoch (and every N epochs, if asked)
            shutil.copytree(folder, ckpt_root, dirs_exist_ok=True)

    hp = Hyperparams(batch_size=32, augment="none", head_hidden=8)
    train(hp, spec=spec, data=data, report=report)
    record = TrialRecord("t1", {"batch_size": 32, "head_hidden": 8}, history, str(ckpt_root))
    [first] = promote(spec, [record], data, echo=lambda s: None)
    [second] = promote(spec, [record], data, echo=lambda s: None)
    assert (first.name, second.name) == ("v1", "v2")
    assert not list(first.parent.glob(".tmp-*"))  # nothing half-written left behind
    assert {p.name for p in first.iterdir()} == {
        "model.safetensors", "spec.yaml", "config.json", "metrics.json", "MODEL_CARD.md"}
    metrics = json.loads((first / "metrics.json").read_text())
    loaded = load_promoted(first)
    _, acc = evaluate(loaded.model, data.test_x, data.test_y)
    assert acc == pytest.approx(metrics["test"]["acc"])
    assert metrics["val"]["best_val_acc"] == max(h["val_acc"] for h in history)
    # The promoted spec fixes every parameter: the trial can be re-run alone.
    from raytune_ft.spec_io import load_spec

    again = load_spec(first / "spec.yaml")
    assert again.search["head_hidden"].value == 8 and again.run.num_samples == 1
    # A promoted model is a backbone to fine-tune again (its head is replaced).
    import torch

    from raytune_ft.models import build_model

    again_built = build_model("resnet18", 3, Hyperparams(), str(first))
    theirs = loaded.model.state_dict()
    for k, v in again_built.model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, theirs[k]), k
    assert again_built.head[-1].out_features == 3
    # A corrupted weights file is refused.
    blob = (first / "model.safetensors").read_bytes()
    (first / "model.safetensors").write_bytes(blob[:-8] + b"\0" * 8)
    with pytest.raises(PromotedModelError, match="sha256"):
        load_promoted(first)


def test_not_a_promoted_folder_keeps_its_cause_for_debug(tmp_path: Path) -> None:
    with pytest.raises(PromotedModelError, match="is not a promoted rtft model") as e:
        load_promoted(tmp_path)
    assert isinstance(e.value.__cause__, FileNotFoundError)



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
        if folder is not None:
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
