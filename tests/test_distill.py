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
from helpers import tiny_spec, write_tiny_spec

from raytune_ft.cli.main import main
from raytune_ft.data import prepare
from raytune_ft.distill import check_teacher_classes, with_teacher_logits
from raytune_ft.errors import UserError
from raytune_ft.knobs import Hyperparams
from raytune_ft.promote import promote
from raytune_ft.runs import TrialRecord
from raytune_ft.spec.yaml_io import parse_spec
from raytune_ft.train import distill_loss, train

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


def _fake_teacher(root: Path, classes: list[str]) -> Path:
    folder = root / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"classes": classes}))
    return folder


@pytest.mark.parametrize("command", ["validate", "search"])
def test_a_teacher_with_other_classes_is_refused(tmp_path: Path, command: str) -> None:
    teacher = _fake_teacher(tmp_path, ["cat", "dog"])
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
    teacher = _fake_teacher(tmp_path, [str(i) for i in range(10)])
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


@pytest.mark.slow
def test_a_tiny_distillation_search_end_to_end(ray_session, tmp_path: Path) -> None:  # noqa: ANN001
    """`rtft search` with `model.teacher`: Ray trials learn from the teacher's logits (computed
    once in the driver), and the promoted student's card stands beside its teacher."""
    spec = tiny_spec(tmp_path)
    data = prepare(spec.data)
    teacher_dir = _train_and_promote(spec, data, Hyperparams(**HP), tmp_path / "ckpt_t")
    spec_file = write_tiny_spec(tmp_path, n=2)
    text = spec_file.read_text().replace(
        "weights: none}", f"weights: none, teacher: {teacher_dir}}}").replace(
        "  batch_size: 32\n", "  batch_size: 32\n  distill_alpha: {space: uniform, low: 0.3, "
        "high: 0.9}\n  distill_temperature: 4.0\n")
    spec_file.write_text(text.replace("name: tiny", "name: student"))
    res = CliRunner().invoke(main, ["search", str(spec_file)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    trials = json.loads((tmp_path / "runs" / "student" / "trials.json").read_text())
    assert len(trials) == 2 and all(0.3 <= t["params"]["distill_alpha"] <= 0.9 for t in trials)
    assert all(t["error"] is None and t["history"] for t in trials)
    [student] = sorted((tmp_path / "models" / "student").glob("v*"))
    card = (student / "MODEL_CARD.md").read_text()
    assert f"Distilled from `{teacher_dir}`" in card
