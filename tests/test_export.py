"""`rtft export` (export.py, cli_export.py): promoted models to ONNX and TorchScript, read back
by their own runtimes and compared with PyTorch; refusals leave no file behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_spec

from raytune_ft import export as E
from raytune_ft.cli.main import main
from raytune_ft.data import normalize, prepare
from raytune_ft.errors import UserError
from raytune_ft.knobs import Hyperparams
from raytune_ft.promote import load_promoted, promote
from raytune_ft.runs import TrialRecord
from raytune_ft.train import train

# One small network per family: 16 px digits for resnet18, 32 px for mobilenet_v3_small (its
# five stride-2 stages leave a 1x1 map there), one epoch each.
ARCHS = {"resnet18": 16, "mobilenet_v3_small": 32}


def _promoted(root: Path, arch: str, size: int) -> Path:
    """A promoted model folder, made as promotion makes them, without a search."""
    spec = tiny_spec(root)
    dump = spec.model_dump()
    dump["model"]["arch"], dump["data"]["image_size"] = arch, size
    dump["train"]["max_epochs"] = 1
    spec = spec.model_validate(dump)
    history: list = []

    def report(m: dict, folder: Path | None) -> None:
        history.append(m)
        shutil.copytree(folder, root / "ckpt", dirs_exist_ok=True)

    data = prepare(spec.data)
    train(Hyperparams(batch_size=32, augment="none", lr=3e-3), spec=spec, data=data,
          report=report)
    record = TrialRecord("t1", {"batch_size": 32}, history, str(root / "ckpt"))
    [folder] = promote(spec, [record], data, echo=lambda s: None)
    return folder


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{arch: a promoted model folder}."""
    return {arch: _promoted(tmp_path_factory.mktemp(arch), arch, size)
            for arch, size in ARCHS.items()}


def _run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["export", *map(str, args)])
    return r.exit_code, r.output


def _reference(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised test images, PyTorch's logits on them) for the promoted model."""
    m = load_promoted(model_dir)
    from raytune_ft.spec.schema import DataSpec

    x = prepare(DataSpec.model_validate(m.config["spec"]["data"])).test_x
    xn = normalize(x, tuple(m.config["mean"]), tuple(m.config["std"]))
    with torch.no_grad():
        return xn, m.model(xn)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_round_trips_with_its_metadata(promoted: dict[str, Path], tmp_path: Path,
                                              arch: str, fmt: str) -> None:
    src = promoted[arch]
    out = tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt'}"
    code, text = _run(src, "--format", fmt, "--out", out)
    assert code == 0, text
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert lines["file"] == str(out) and out.exists()
    assert lines["top-1 agreement"].startswith("100% (")
    assert "test split; data fingerprint matches" in lines["images"]
    assert float(lines["max abs diff"].split()[0]) < 1e-3
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed, not copied

    # Read back by its own runtime, independently of export.py, on the held-out test images.
    xn, want = _reference(src)
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"image": xn.numpy()})[0])
    else:
        got = torch.jit.load(str(out))(xn)
    assert got.shape == want.shape and lines["images"].startswith(f"{len(xn)} ")
    assert (got.argmax(1) == want.argmax(1)).all()
    assert (got - want).abs().max().item() < 1e-3

    # The metadata travels inside the file.
    config = load_promoted(src).config
    meta = E.read_metadata(out)
    size = ARCHS[arch]
    assert meta["classes"] == config["classes"] == [str(i) for i in range(10)]
    assert meta["input_size"] == [3, size, size] and meta["arch"] == arch
    assert meta["mean"] == pytest.approx(config["mean"]) and meta["std"] == pytest.approx(
        config["std"])
    assert meta["weights_sha256"] == load_promoted(src).metrics["sha256"]
    if fmt == "onnx":  # plain ONNX tooling sees the properties too
        import onnx

        props = {p.key for p in onnx.load(str(out)).metadata_props}
        assert {"classes", "input_size", "mean", "std", "weights_sha256"} <= props


def test_default_destination_is_inside_the_model_folder(promoted: dict[str, Path],
                                                        tmp_path: Path) -> None:
    src = shutil.copytree(promoted["resnet18"], tmp_path / "v1")
    code, text = _run(src, "--format", "torchscript", "--max-images", 10)
    assert code == 0, text
    assert (src / "model.torchscript.pt").exists() and "images: 10 (test split" in text


def test_a_disagreeing_export_is_refused_and_leaves_no_file(
        promoted: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = E._runner

    def corrupted(fmt: str, path: Path):  # noqa: ANN202
        run = real(fmt, path)
        return lambda xb: run(xb).roll(1, dims=1)  # every image's classes shifted by one

    monkeypatch.setattr(E, "_runner", corrupted)
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / f"bad.{fmt}"
        code, text = _run(promoted["resnet18"], "--format", fmt, "--out", out)
        assert code == 2, text
        assert text.startswith(f"error: the {fmt} export is refused: its top-1 class differs "
                               f"from PyTorch's on ")
        assert "nothing was written" in text and len(text.strip().splitlines()) == 1
        assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_an_existing_file_is_kept_when_the_new_export_is_refused(
        promoted: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr(E, "_compare", lambda *a: (0.5, 0, (0, 1, 2)))
    code, text = _run(promoted["resnet18"], "--out", out, "--max-images", 4)
    assert code == 2 and "on 4 of 4 test images (first: image 0, PyTorch '1', onnx '2'" in text
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


class _Unsupported(torch.nn.Module):
    """A network with an operator neither exporter writes (no ONNX or TorchScript form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x.mean(1)).real.sum(-1, keepdim=True)


def test_an_unsupported_operator_is_named_in_one_line(tmp_path: Path,
                                                     capfd: pytest.CaptureFixture) -> None:
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(UserError, match=r"cannot be exported to onnx: operator aten::\w+ is not "
                                        r"supported by the onnx exporter") as e:
        E.write_export(_Unsupported(), "onnx", x, tmp_path / "u.onnx", {"arch": "odd"})
    assert str(e.value).startswith("odd cannot be exported to onnx: operator aten::linalg_eig")
    # The exporter's dump of the whole graph (C++, on the process's stdout) is not shown.
    assert "graph" not in capfd.readouterr().out


class _Attention(torch.nn.Module):
    """What a ViT block does: nn.MultiheadAttention, whose eval-mode fast path under no_grad
    (aten::_native_multi_head_attention) has no ONNX form."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(12, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.flatten(2).transpose(1, 2).repeat(1, 1, 4)  # (N, 16, 12)
        return self.attn(seq, seq, seq, need_weights=False)[0].mean(1)


def test_attention_blocks_export_to_onnx(tmp_path: Path) -> None:
    model = _Attention().eval()
    path = tmp_path / "a.onnx"
    E.write_export(model, "onnx", torch.randn(2, 3, 4, 4), path, {"arch": "attn"})
    diff, agree, _ = E._compare(model, "onnx", path, iter([torch.randn(5, 3, 4, 4)]))
    assert agree == 5 and diff < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx"], "is not a promoted rtft model"),
    (["--format", "tflite"], "Invalid value for '--format'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    code, text = _run(tmp_path, *args)
    assert code == 2 and message in text, text
