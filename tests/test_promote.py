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
from helpers import ENV, ROOT, tiny_spec, train_tiny

from raytune_ft.data import prepare
from raytune_ft.knobs import Hyperparams
from raytune_ft.promote import PromotedModelError, load_promoted, promote
from raytune_ft.runs import TrialRecord
from raytune_ft.spec.yaml_io import spec_to_yaml
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
    from raytune_ft.spec.yaml_io import load_spec

    again = load_spec(first / "spec.yaml")
    assert again.search["head_hidden"].value == 8 and again.run.num_samples == 1
    # A promoted model is a backbone to fine-tune again (its head is replaced).
    import torch

    from raytune_ft.model.build import build_model

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
# Cost-aware promotion: bounds, the Pareto front, an architecture search's trial.
# --------------------------------------------------------------------------------------------
def _variant(record: TrialRecord, tid: str, acc: float, ms: float, params: int) -> TrialRecord:
    """`record`'s checkpoint with a made-up history: best val_acc `acc`, latency `ms`."""
    hist = [{**h, "val_acc": acc - 0.01 * (len(record.history) - i), "params": params,
             "flops": 1e6, "latency_b1_ms": ms, "latency_b32_ms": 8 * ms, "epoch_s": 0.5}
            for i, h in enumerate(record.history, 1)]
    return TrialRecord(tid, dict(record.params), hist, record.best_checkpoint)


def test_promotion_honours_the_bounds_and_says_when_none_fits(trained) -> None:  # noqa: ANN001
    from raytune_ft.errors import UserError

    root, spec, record = trained
    records = [_variant(record, "fast", 0.6, 1.0, 1000), _variant(record, "slow", 0.9, 9.0, 9000)]
    bounded = spec.model_copy(update={"name": "bounded", "promote": spec.promote.model_copy(
        update={"max_latency_ms": 5.0})})
    data = prepare(spec.data)
    [v1] = promote(bounded, records, data, echo=lambda s: None)
    assert json.loads((v1 / "metrics.json").read_text())["trial_id"] == "fast"
    card = (v1 / "MODEL_CARD.md").read_text()
    assert "## Cost (measured in trial fast, on its CPU)" in card
    assert "| architecture | resnet18 |" in card and "| latency, batch 1 | 1 ms |" in card
    assert "| latency, batch 32 | 8 ms |" in card and "| parameters | 1,000 |" in card
    none_fit = bounded.model_copy(update={"promote": bounded.promote.model_copy(
        update={"max_latency_ms": 0.5, "max_params": None})})
    with pytest.raises(UserError, match=r"no trial fits max_latency_ms 0.5 ms \(the smallest "
                                        r"latency_b1_ms is 1 ms\)") as e:
        promote(none_fit, records, data, echo=lambda s: None)
    assert e.value.field == "promote.max_latency_ms"
    assert sorted(p.name for p in v1.parent.iterdir()) == ["LATEST", "v1"]  # nothing written


def test_pareto_promotes_every_point_of_the_front_cheapest_first(trained) -> None:  # noqa: ANN001
    root, spec, record = trained
    spec = spec.model_copy(update={"name": "front"})
    records = [_variant(record, "c", 0.9, 9.0, 9000), _variant(record, "a", 0.6, 1.0, 1000),
               _variant(record, "dominated", 0.5, 4.0, 500), _variant(record, "b", 0.8, 3.0, 3000)]
    lines: list[str] = []
    out = promote(spec, records, prepare(spec.data), echo=lines.append, pareto=True)
    assert [p.name for p in out] == ["v1", "v2", "v3"]
    metrics = [json.loads((p / "metrics.json").read_text()) for p in out]
    assert [m["trial_id"] for m in metrics] == ["a", "b", "c"]
    assert [m["cost"]["latency_b1_ms"] for m in metrics] == [1.0, 3.0, 9.0]
    assert all(m["pareto"] and m["arch"] == "resnet18" for m in metrics)
    assert "Pareto point 1/3, latency_b1_ms 1" in lines[0]
    assert (out[0].parent / "LATEST").read_text().strip() == "v3"


def test_a_trial_of_an_architecture_search_is_promoted_with_its_own_spec(
        tmp_path: Path) -> None:
    from raytune_ft.spec.yaml_io import load_spec, parse_spec

    spec = parse_spec(f"""\
name: pick
model: {{arch: {{space: choice, values: [resnet18, mobilenet_v3_small]}}, weights: none}}
data: {{source: digits, image_size: 32, train_limit: 100}}
train: {{max_epochs: 1}}
search:
  lr: {{space: loguniform, low: 1.0e-3, high: 1.0e-2}}
  head_dropout: {{space: uniform, low: 0, high: 0.5, when: {{arch: [resnet18]}}}}
  batch_size: 32
promote: {{dir: {tmp_path}/models}}
""", file="pick.yaml")
    params = {"arch": "mobilenet_v3_small", "lr": 0.005, "batch_size": 32}
    tspec = spec.for_trial(params)
    data = prepare(tspec.data)
    history = train_tiny(tspec, Hyperparams(batch_size=32, lr=0.005, augment="none"),
                         tmp_path / "ckpt", data)
    record = TrialRecord("m1", params, history, str(tmp_path / "ckpt"))
    [v1] = promote(spec, [record], None, echo=lambda s: None)  # its data read for its size
    again = load_spec(v1 / "spec.yaml")  # a plain single-arch spec: export, reproduce read it
    assert again.model.arch == "mobilenet_v3_small" and not again.arch_searched
    assert set(again.search) == {"lr", "batch_size"} and again.search["lr"].value == 0.005
    card = (v1 / "MODEL_CARD.md").read_text()
    assert card.startswith("# pick — mobilenet_v3_small, promoted from trial m1")
    assert "| architecture | mobilenet_v3_small |" in card
    # The cost the trainer measured in the trial (raytune_ft.model.cost), as it measured it.
    assert f"| parameters | {record.cost['params']:,} |" in card
    assert f"| latency, batch 1 | {record.cost['latency_b1_ms']:.3g} ms |" in card
    loaded = load_promoted(v1)
    _, acc = evaluate(loaded.model, data.test_x, data.test_y)
    assert acc == pytest.approx(json.loads((v1 / "metrics.json").read_text())["test"]["acc"])


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
from raytune_ft.runs import TrialRecord
from raytune_ft.spec.yaml_io import load_spec

spec_file, record_file, point = sys.argv[1:4]
spec = load_spec(spec_file)
record = TrialRecord(**json.loads(open(record_file).read()))

def die():
    print("dying", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

if point == "half":
    sha = P.file_sha256
    def file_sha256(path):
        if path.parent.name.startswith(".tmp-"):
            die()
        return sha(path)
    P.file_sha256 = file_sha256
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

    from raytune_ft.knobs import Hyperparams
    from raytune_ft.runs import TrialRecord

    root = tmp_path_factory.mktemp("promote")
    spec = tiny_spec(root)
    history = train_tiny(spec, Hyperparams(batch_size=32, augment="none"), root / "ckpt")
    return root, spec, TrialRecord("t1", {"batch_size": 32}, history, str(root / "ckpt"))


def _versions(models: Path) -> dict[str, set[str]]:
    return {p.name: {f.name for f in p.iterdir()} for p in models.glob("v*")}


@pytest.mark.slow  # two fresh processes that import torch: ~10 s
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
# The trial's environment on the card; one file mode for the whole folder (shared storage).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664)])
def test_a_promoted_model_and_its_checkpoint_have_one_mode_and_the_trials_environment(
        trained, tmp_path: Path, mask: int, mode: int) -> None:  # noqa: ANN001
    """Under umask 022 every file is 0644, under 002 0664: safetensors alone wrote its file
    0600, which on shared storage hid the weights from a teammate who could read the rest."""
    import os

    from raytune_ft.checkpoint import load_checkpoint, save_checkpoint

    _, spec, record = trained
    spec = spec.model_copy(update={"name": f"modes{mask:o}", "promote": spec.promote.model_copy(
        update={"dir": str(tmp_path / "models")})})
    state, config = load_checkpoint(record.best_checkpoint)
    old = os.umask(mask)
    try:  # the trial's checkpoint written again under this umask, then promoted from it
        ckpt = save_checkpoint(tmp_path / "ckpt", model=state["model"], optimizer=None,
                               scheduler=None, epoch=state["epoch"], best=state["best"],
                               config=config)
        rec = TrialRecord(record.trial_id, record.params, record.history, str(ckpt))
        [v1] = promote(spec, [rec], prepare(spec.data), echo=lambda s: None)
    finally:
        os.umask(old)
    files = [*ckpt.iterdir(), *v1.iterdir(), v1.parent / "LATEST"]
    modes = {f"{p.parent.name}/{p.name}": oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(mode)}, modes
    assert len(modes) == 2 + len(FILES) + 1

    # The environment the trainer recorded in the checkpoint: in config.json and on the card.
    env = json.loads((v1 / "config.json").read_text())["environment"]
    assert env == config["environment"] and env["device"] == "cpu" and env["threads"] >= 1
    card = (v1 / "MODEL_CARD.md").read_text()
    section = card.split(f"## Environment (trial {record.trial_id}, as its trainer recorded "
                         f"it)\n", 1)[1].split("\n## ", 1)[0]
    assert f"| torch / torchvision | {env['torch']} / {env['torchvision']} |" in section
    assert f"| CPU | {env['cpu']} ({env['arch']}) |" in section
    assert f"| device, torch threads | cpu, {env['threads']} |" in section
    assert "| precision (autocast) | fp32 |" in section and "| GPU |" not in section
    assert " ".join(env["isa"]) in section and env["cpu_capability"] in section


def test_the_card_says_when_no_environment_was_recorded() -> None:
    from raytune_ft.promote import _environment_section

    rec = TrialRecord("old", {}, [])
    assert "Not recorded (the trial ran on an rtft before" in _environment_section(rec, None)
