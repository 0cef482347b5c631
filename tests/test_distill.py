"""Distillation (model.teacher, distill_alpha, distill_temperature): the loss by hand, alpha 0
bit for bit the plain trainer, the teacher's logits computed once from a promoted model, the
student's model card beside its teacher, and bad teachers refused before anything is written."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import fake_teacher, tiny_spec, write_tiny_spec

from raytune_ft.cli.main import main
from raytune_ft.data import prepare
from raytune_ft.distill import check_teacher_classes, with_teacher_logits
from raytune_ft.errors import UserError
from raytune_ft.knobs import Hyperparams
from raytune_ft.promote import promote
from raytune_ft.runs import TrialRecord
from raytune_ft.spec.yaml_io import parse_spec
from raytune_ft.train import distill_loss, pick_device, train

STUDENT = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
TEACHER = torch.tensor([[1.0, 1.5, 0.0], [-0.5, 0.0, 2.0]])
HP = dict(batch_size=32, augment="none")


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_distill_loss_matches_a_hand_computation() -> None:
    alpha, t, task = 0.3, 2.0, torch.tensor(0.7)
    kl = sum(sum(p * math.log(p / q) for p, q in zip(_softmax(tr, t), _softmax(sr, t),
                                                      strict=True))
             for sr, tr in zip(STUDENT.tolist(), TEACHER.tolist(), strict=True)) / 2
    by_hand = (1 - alpha) * 0.7 + alpha * t * t * kl
    got = distill_loss(task, STUDENT, TEACHER, alpha=alpha, temperature=t)
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    # The student equal to the teacher: no soft term left.
    same = distill_loss(task, TEACHER, TEACHER, alpha=1.0, temperature=t)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow  # two trainings, ~4 s (fast-loop headroom)
def test_alpha_zero_is_the_plain_loss_and_the_plain_trainer_exactly(tmp_path: Path) -> None:
    task = torch.tensor(1.2345)
    assert torch.equal(distill_loss(task, STUDENT, TEACHER, alpha=0.0, temperature=4.0), task)
    spec = tiny_spec(tmp_path)
    data = prepare(spec.data)
    teacher = replace(data, teacher_logits=torch.randn(len(data.train_y), data.num_classes))
    plain: list = []
    zero: list = []
    train(Hyperparams(**HP), spec=spec, data=data, report=lambda m, f: plain.append(m),
          checkpoints=False)
    train(Hyperparams(**HP, distill_alpha=0.0), spec=spec, data=teacher,
          report=lambda m, f: zero.append(m), checkpoints=False)
    key = ("train_loss", "val_loss", "val_acc")
    assert [[m[k] for k in key] for m in zero] == [[m[k] for k in key] for m in plain]


def test_the_trainer_distills_and_refuses_mixup(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    data = prepare(spec.data)
    teacher = replace(data, teacher_logits=torch.randn(len(data.train_y), data.num_classes) * 3)
    got: list = []
    result = train(Hyperparams(**HP, distill_alpha=0.7, distill_temperature=2.0), spec=spec,
                   data=teacher, report=lambda m, f: got.append(m), checkpoints=False)
    assert [m["epoch"] for m in got] == [1, 2] and not result.diverged
    assert all(math.isfinite(m["train_loss"]) for m in got)
    with pytest.raises(ValueError, match="mixup"):
        train(Hyperparams(**HP, mixup_alpha=0.2), spec=spec, data=teacher,
              report=lambda m, f: None, checkpoints=False)


def test_knobs_are_searchable_and_validated() -> None:
    spec = parse_spec("name: t\nmodel: {teacher: models/t/v1}\nsearch:\n"
                      "  distill_alpha: {space: uniform, low: 0.0, high: 1.0}\n"
                      "  distill_temperature: {space: choice, values: [2.0, 4.0]}\n",
                      file="t.yaml")
    assert set(spec.search) == {"distill_alpha", "distill_temperature"}
    # Without a teacher the knobs would do nothing: refused (tests/bad_specs/distill_*).
    with pytest.raises(UserError, match="only counts with model.teacher"):
        parse_spec("name: t\nsearch:\n  distill_alpha: 0.5\n", file="t.yaml")
    with pytest.raises(UserError, match="distill_alpha"):
        parse_spec("name: t\nsearch:\n  distill_alpha: {space: uniform, low: 0.0, high: 1.5}\n",
                   file="t.yaml")
    with pytest.raises(UserError, match="distill_temperature"):
        parse_spec("name: t\nsearch:\n  distill_temperature: 0\n", file="t.yaml")


def test_validate_refuses_what_loading_the_teacher_would(tmp_path: Path) -> None:
    """`rtft validate` refuses, before any work, the teachers the search would refuse once it
    loads them: replaced weights, another input size."""
    spec_file = write_tiny_spec(tmp_path)  # 16 px
    teacher = fake_teacher(tmp_path, [str(i) for i in range(10)], image_size=32)
    res = CliRunner().invoke(main, ["validate", str(spec_file), "--set",
                                    f"model.teacher={teacher}"])
    assert res.exit_code == 2 and "takes 32-px images, the data here is 16 px" in res.output, \
        res.output
    (teacher / "model.safetensors").write_bytes(b"other weights")
    res = CliRunner().invoke(main, ["validate", str(spec_file), "--set",
                                    f"model.teacher={teacher}"])
    assert res.exit_code == 2 and "sha256 does not match metrics.json" in res.output, res.output
    assert "model.teacher" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("command", ["validate", "search"])
def test_a_teacher_with_other_classes_is_refused(tmp_path: Path, command: str) -> None:
    teacher = fake_teacher(tmp_path, ["cat", "dog"])
    spec_file = write_tiny_spec(tmp_path)
    res = CliRunner().invoke(main, [command, str(spec_file), "--set",
                                    f"model.teacher={teacher}"])
    assert res.exit_code == 2, res.output
    assert "model.teacher" in res.output and "cat, dog" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


def test_a_missing_teacher_and_mixup_beside_a_teacher_are_refused(tmp_path: Path) -> None:
    spec_file = write_tiny_spec(tmp_path)
    res = CliRunner().invoke(main, ["validate", str(spec_file), "--set",
                                    f"model.teacher={tmp_path / 'nowhere'}"])
    assert res.exit_code == 2 and "not a promoted rtft model" in res.output, res.output
    teacher = fake_teacher(tmp_path, [str(i) for i in range(10)])
    res = CliRunner().invoke(main, ["validate", str(spec_file), "--set",
                                    f"model.teacher={teacher}", "--set",
                                    "search.mixup_alpha=0.2"])
    assert res.exit_code == 2 and "search.mixup_alpha" in res.output, res.output


def test_same_count_other_names_refused_after_the_data_is_read(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, extra="")
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"teacher": "t/v1"})})
    with pytest.raises(UserError, match=r"teacher \[a, b\], data \[0, 1\]"):
        check_teacher_classes(spec, ["a", "b"], ["0", "1"])


def _train_and_promote(spec, data, hp: Hyperparams, ckpt: Path) -> Path:  # noqa: ANN001
    history: list = []

    def report(m: dict, folder: Path | None) -> None:
        history.append(m)
        if folder is not None:
            shutil.copytree(folder, ckpt, dirs_exist_ok=True)

    train(hp, spec=spec, data=data, report=report)
    params = hp.model_dump(include={"batch_size", "augment", "distill_alpha"})
    [dest] = promote(spec, [TrialRecord("t1", params, history, str(ckpt))], data,
                     echo=lambda s: None)
    return dest


@pytest.mark.slow  # trains and promotes a teacher, then a student: ~6 s
def test_a_promoted_teacher_is_run_once_and_named_on_the_students_card(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    data = prepare(spec.data)
    teacher_dir = _train_and_promote(spec, data, Hyperparams(**HP), tmp_path / "ckpt_t")
    student_spec = tiny_spec(tmp_path, extra="").model_copy(update={
        "name": "student",
        "model": spec.model.model_copy(update={"arch": "resnet18",
                                               "teacher": str(teacher_dir)})})
    with_t = with_teacher_logits(student_spec, data)
    assert with_t.teacher_logits.shape == (len(data.train_y), data.num_classes)
    assert with_t.without_test().teacher_logits is with_t.teacher_logits
    student = _train_and_promote(student_spec, with_t, Hyperparams(**HP, distill_alpha=0.5),
                                 tmp_path / "ckpt_s")
    card = (student / "MODEL_CARD.md").read_text()
    teacher_acc = json.loads((teacher_dir / "metrics.json").read_text())["test"]["acc"]
    assert f"Distilled from `{teacher_dir}`" in card and f"{teacher_acc:.4f}" in card
    assert "(teacher folder unreadable)" not in card
    import re  # both measured at promotion: accuracy, parameters, CPU latency at batch 1

    for who in ("student \\(this model\\)", "teacher"):
        assert re.search(rf"\| {who} \| [0-9.]+ \| [0-9,]+ \| [0-9.]+ ms \|", card), card
    # Another image size is refused, naming both sizes.
    bigger = student_spec.model_copy(update={"data": spec.data.model_copy(
        update={"image_size": 24})})
    with pytest.raises(UserError, match="16-px images, the data here is 24 px"):
        with_teacher_logits(bigger, prepare(bigger.data))


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _teacher_files(root: Path, logits: torch.Tensor) -> Path:
    """A stand-in promoted folder: weights bytes and the metrics.json that names their sha256
    (what teacher.json records; nothing is loaded)."""
    folder = root / "models" / "teacher" / "v3"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" + logits.numpy().tobytes())
    sha = _sha((folder / "model.safetensors").read_bytes())
    (folder / "metrics.json").write_text(json.dumps({"sha256": sha, "arch": "resnet18",
                                                     "test": {"acc": 0.875}}))
    return folder


def test_the_teacher_record_names_it_and_a_resume_with_another_teacher_is_refused(
        tmp_path: Path) -> None:
    """teacher.json: path, version, weights sha256, test accuracy, device, threads and the
    logits' sha256; a resumed run must keep its teacher (another sha256 is refused)."""
    from raytune_ft.distill import (
        check_same_teacher,
        logits_sha256,
        read_teacher_record,
        record_teacher,
    )

    spec = tiny_spec(tmp_path)
    data = prepare(spec.data)
    logits = torch.randn(len(data.train_y), data.num_classes)
    folder = _teacher_files(tmp_path, logits)
    spec = spec.model_copy(update={"model": spec.model.model_copy(
        update={"teacher": str(folder)})})
    by_size = {16: replace(data, teacher_logits=logits)}
    run = tmp_path / "run"
    run.mkdir()
    record_teacher(run, spec, by_size)
    rec = read_teacher_record(run)
    sha = json.loads((folder / "metrics.json").read_text())["sha256"]
    assert rec == {"path": str(folder), "resolved": str(folder.resolve()), "name": "teacher",
                   "version": "v3", "sha256": sha, "arch": "resnet18", "test_acc": 0.875,
                   "created": None, "device": str(pick_device(spec.train.device)),
                   "threads": torch.get_num_threads(),
                   "logits_sha256": {"16": logits_sha256(logits)}}
    record_teacher(run, spec, by_size)  # the same teacher again (a resume): fine
    (folder / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(UserError, match="changed while the search started"):
        record_teacher(run, spec, by_size)  # weights no longer those metrics.json names
    (folder / "metrics.json").write_text(json.dumps({"sha256": _sha(b"other weights")}))
    with pytest.raises(UserError, match=r"not the one this run started with: .*allowed: "
                                        r"resume with that teacher"):
        record_teacher(run, spec, by_size)
    # The resume asks first, before the teacher runs or any file is rewritten:
    with pytest.raises(UserError, match=r"not the one this run started with"):
        check_same_teacher(run, spec)
    assert read_teacher_record(run)["sha256"] == sha  # left as it was
    (run / "teacher.json").write_text("[1]")
    with pytest.raises(UserError, match="not the teacher record rtft wrote"):
        read_teacher_record(run)
    assert read_teacher_record(tmp_path) is None  # a run without a teacher


def test_reproduce_refuses_a_distilled_trial_without_its_teacher_step(tmp_path: Path) -> None:
    """The Python API: reproducing a distilled trial without `teacher=` would train without
    the teacher's logits (every figure off); refused before any data is read."""
    from raytune_ft.reproduce import reproduce

    run = tmp_path / "run"
    run.mkdir()
    text = TINY_SPEC_TEACHER.format(root=tmp_path)
    (run / "spec.yaml").write_text(text)
    (run / "trials.json").write_text(json.dumps([
        {"trial_id": "t1", "params": {}, "history": [{"epoch": 1, "val_acc": 0.5}]}]))
    with pytest.raises(UserError, match="was distilled from .*pass teacher=raytune_ft.distill"):
        reproduce(run, "t1", echo=lambda s: None)


TINY_SPEC_TEACHER = """\
name: student
model: {{arch: resnet18, weights: none, teacher: {root}/models/t/v1}}
data: {{source: digits, image_size: 16, train_limit: 160}}
search: {{distill_alpha: 0.5}}
"""


# --------------------------------------------------------------------------------------------
# A real tiny distillation search, its trials reproduced with their teacher
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distilled(ray_session, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:  # noqa: ANN001
    """(run folder, teacher folder, search output) of `rtft search` with `model.teacher`."""
    tmp_path = tmp_path_factory.mktemp("distilled")
    spec = tiny_spec(tmp_path)
    data = prepare(spec.data)
    teacher_dir = _train_and_promote(spec, data, Hyperparams(**HP), tmp_path / "ckpt_t")
    spec_file = write_tiny_spec(tmp_path, n=2)
    text = spec_file.read_text().replace(
        "weights: none}", f"weights: none, teacher: {teacher_dir}}}").replace(
        "  batch_size: 32\n", "  batch_size: 32\n  distill_alpha: {space: uniform, low: 0.3, "
        "high: 0.9}\n  distill_temperature: {space: choice, values: [2.0, 4.0]}\n")
    spec_file.write_text(text.replace("name: tiny", "name: student"))
    res = CliRunner().invoke(main, ["search", str(spec_file)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return tmp_path / "runs" / "student", teacher_dir, res.output


@pytest.mark.slow
def test_a_tiny_distillation_search_end_to_end(distilled: tuple[Path, Path, str]) -> None:
    """`rtft search` with `model.teacher`: Ray trials learn from the teacher's logits (computed
    once in the driver), the run records its teacher, and the promoted student's card names
    the teacher and the trial's distillation knobs."""
    run, teacher_dir, _ = distilled
    trials = json.loads((run / "trials.json").read_text())
    assert len(trials) == 2 and all(0.3 <= t["params"]["distill_alpha"] <= 0.9 for t in trials)
    assert all(t["error"] is None and t["history"] for t in trials)
    rec = json.loads((run / "teacher.json").read_text())
    t_metrics = json.loads((teacher_dir / "metrics.json").read_text())
    assert rec["path"] == str(teacher_dir) and rec["version"] == "v1" and rec["name"] == "tiny"
    assert rec["sha256"] == t_metrics["sha256"] and rec["test_acc"] == t_metrics["test"]["acc"]
    assert set(rec["logits_sha256"]) == {"16"}
    [student] = sorted((run.parents[1] / "models" / "student").glob("v*"))
    card = (student / "MODEL_CARD.md").read_text()
    params = json.loads((student / "metrics.json").read_text())["params"]
    assert f"Distilled from `{teacher_dir}`" in card
    assert "| model, version | tiny, v1 (resnet18) |" in card
    assert f"| weights sha256 | `{t_metrics['sha256']}` |" in card
    assert f"| held-out test accuracy | {t_metrics['test']['acc']:.4f} |" in card
    assert f"| distill_alpha (this trial; searched) | {params['distill_alpha']:g} |" in card
    assert f"| distill_temperature (this trial) | {params['distill_temperature']:g} |" in card


@pytest.mark.slow
def test_a_distilled_trial_reproduces_exactly_with_its_teacher(
        distilled: tuple[Path, Path, str]) -> None:
    """`rtft reproduce` loads the recorded teacher (sha256 checked), recomputes its logits as
    the search did (the same bits), and every figure of every trial matches exactly."""
    run, teacher_dir, _ = distilled
    for t in json.loads((run / "trials.json").read_text()):
        res = CliRunner().invoke(main, ["reproduce", str(run), t["trial_id"]],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert f"teacher: {teacher_dir} (tiny/v1, weights sha256 " in res.output
        device = str(pick_device("auto"))  # the driver's, where the search ran the teacher
        assert f"as recorded); its logits on 160 training images, {device}, 1 thread(s): " \
            "identical to the search's" in res.output, res.output
        n = 3 * len(t["history"])
        assert f"trial {t['trial_id']} reproduces on cpu, same environment: all {n} figures " \
            "match exactly" in res.output, res.output


def _files(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.slow
def test_a_changed_or_vanished_teacher_is_refused_by_reproduce(
        distilled: tuple[Path, Path, str]) -> None:
    """A teacher whose weights changed since the search, or that is gone: one line naming it
    and what is allowed, exit code 2, nothing trained or written."""
    run, teacher_dir, _ = distilled
    trial_id = json.loads((run / "trials.json").read_text())[0]["trial_id"]
    weights = teacher_dir / "model.safetensors"
    original = weights.read_bytes()
    before = _files(run)
    sha = json.loads((run / "teacher.json").read_text())["sha256"]
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit
        res = CliRunner().invoke(main, ["reproduce", str(run), trial_id])
    finally:
        weights.write_bytes(original)
    assert res.exit_code == 2, res.output
    [line] = [ln for ln in res.output.splitlines() if ln.strip()]
    assert f"the teacher '{teacher_dir}' changed since the search: weights sha256 " in line
    assert f"recorded {sha[:16]}…" in line and "allowed: the teacher the search used (tiny/v1" \
        in line and "Traceback" not in res.output
    moved = teacher_dir.with_name("v1-moved")
    teacher_dir.rename(moved)
    try:
        res = CliRunner().invoke(main, ["reproduce", str(run), trial_id])
    finally:
        moved.rename(teacher_dir)
    assert res.exit_code == 2, res.output
    [line] = [ln for ln in res.output.splitlines() if ln.strip()]
    assert f"the teacher '{teacher_dir}' this trial was distilled from is not here" in line
    assert "model.teacher" in line and "allowed: the teacher the search used" in line
    assert _files(run) == before
