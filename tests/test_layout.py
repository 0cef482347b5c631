"""The package's shape, as README.md's Layout section draws it: layers, no cycle, light imports."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "raytune_ft"


def _module_name(f: Path) -> str:
    rel = f.relative_to(PKG).with_suffix("")
    return "/".join(p for p in rel.parts if p != "__init__") or "raytune_ft"


def _imports() -> dict[str, set[str]]:
    """{module: modules of ours it imports at module level}, names as README writes them."""
    files = {_module_name(f): f for f in PKG.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, f in files.items():
        deps: set[str] = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("raytune_ft"):
                base = node.module.removeprefix("raytune_ft").lstrip(".").replace(".", "/")
                for alias in node.names:
                    sub = f"{base}/{alias.name}".lstrip("/")
                    deps.add(sub if sub in files else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("raytune_ft.").replace(".", "/")
                         for a in node.names if a.name.startswith("raytune_ft.")}
        out[name] = {d for d in deps if d and d != name}
    return out


def _layers() -> dict[str, int]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    layers = {}
    for line in block.strip().splitlines():
        m = re.match(r"\s*(\d+)\s+(.*?)(\s{2,}\(.*\))?$", line)
        assert m, line
        for name in m.group(2).split(","):
            layers[name.strip()] = int(m.group(1))
    return layers


def test_every_module_imports_only_from_layers_below() -> None:
    layers, imports = _layers(), _imports()
    assert {"preflight", "search/trainable", "promote"} <= imports["search/run"]  # it reads
    placed = set(layers) | {"raytune_ft", "search"}  # the packages' __init__ import lazily
    assert set(imports) <= placed, f"not in README's Layout: {sorted(set(imports) - placed)}"
    wrong = [f"{m} (layer {layers[m]}) imports {d} (layer {layers.get(d)})"
             for m, deps in imports.items() if m in layers
             for d in deps if d in layers and layers[d] >= layers[m]]
    assert not wrong, wrong


def test_no_import_cycle() -> None:
    imports = _imports()
    seen: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        seen[m] = "open"
        for d in imports.get(m, ()):
            assert seen.get(d) != "open", " -> ".join([*path, d])
            if d not in seen:
                visit(d, [*path, d])
        seen[m] = "done"

    for m in imports:
        if m not in seen:
            visit(m, [m])


@pytest.mark.parametrize("module", ["raytune_ft.cli", "raytune_ft.spec", "raytune_ft.runs",
                                    "raytune_ft.search.records", "raytune_ft.spec_io"])
def test_light_modules_import_neither_torch_nor_ray(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"


def test_reading_a_spec_and_a_finished_run_imports_neither_torch_nor_ray(tmp_path) -> None:
    """What `rtft --help`, `rtft results` and a spec check do, in a fresh process: `rtft
    results` on a run whose trials.json is current reads it without Ray or torch."""
    run = tmp_path / "run"
    (run / "tune" / "trial_t1").mkdir(parents=True)
    (run / "tune" / "experiment_state-x.json").write_text("{}")
    (run / "spec.yaml").write_text((ROOT / "search_spaces" / "resnet.yaml").read_text())
    (run / "trials.json").write_text(json.dumps([{
        "trial_id": "t1", "params": {"lr": 0.01}, "history": [{"epoch": 1, "val_acc": 0.5}]}]))
    code = ("import sys; from click.testing import CliRunner; from raytune_ft.cli import main; "
            f"r = CliRunner().invoke(main, ['results', {str(run)!r}]); "
            "h = CliRunner().invoke(main, ['--help']); "
            "print(r.exit_code, h.exit_code, r.output.splitlines()[:1]); "
            "print(sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    status, loaded = out.stdout.strip().splitlines()
    assert status.startswith("0 0 ['1 trials"), status
    assert loaded == "[]", f"rtft results/--help import {loaded}"


def test_no_module_is_much_over_400_lines() -> None:
    big = {_module_name(f): n for f in PKG.rglob("*.py")
           if (n := len(f.read_text().splitlines())) > 440}
    assert not big, big
