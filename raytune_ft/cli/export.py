"""`rtft export MODEL_DIR`: a promoted model as an ONNX or TorchScript file, checked against
PyTorch on the held-out test split before it is kept (:mod:`raytune_ft.export`).

torch, onnx and onnxruntime are imported inside the command: `rtft --help` stays light.
"""

from __future__ import annotations

from pathlib import Path

import click

from raytune_ft.cli.common import guard


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx",
              show_default=True, help="onnx (needs raytune-ft[export]) or torchscript.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The file to write (default: MODEL_DIR/model.onnx or "
                   "MODEL_DIR/model.torchscript.pt). Replaced atomically.")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Check on the first N test images only (default: all of them).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guard
def export(model_dir: Path, fmt: str, out: Path | None, max_images: int | None,
           debug: bool) -> None:
    """Export the promoted model in MODEL_DIR (models/<name>/vN) to ONNX or TorchScript.

    The file is run by its own runtime (onnxruntime, torch.jit.load) on the held-out test
    split and compared with PyTorch: if its top-1 class differs on any image, it is refused
    and nothing is written. Classes, input size, mean/std and the weights' sha256 travel
    inside the file. Its input: float32 (N, 3, H, W), RGB in [0, 1], normalised with mean/std.

    \b
    Examples:
      rtft export models/resnet18-digits/v1 --format onnx
      rtft export models/resnet18-digits/v1 --format torchscript --out resnet18.pt
    """
    from raytune_ft.export import export_model

    r = export_model(model_dir, fmt, out, max_images=max_images)
    fingerprint = "matches the promotion's" if r.data_matches else \
        "DIFFERS from metrics.json's: the data changed since promotion"
    click.echo(f"file: {r.path}")
    click.echo(f"format: {r.format} ({r.exporter})")
    click.echo(f"size: {r.size_bytes / 1e6:.1f} MB ({r.size_bytes} bytes)")
    click.echo(f"images: {r.n_images} ({r.split} split; data fingerprint {fingerprint})")
    click.echo(f"max abs diff: {r.max_abs_diff:.2e} (logits, export vs PyTorch)")
    click.echo(f"top-1 agreement: {r.agreement:.0%} ({round(r.agreement * r.n_images)}/"
               f"{r.n_images})")
