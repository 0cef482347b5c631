"""The package's shape, as docs/architecture.md's Layout section draws it: layers, no cycle
(imports inside functions included), light imports."""

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
PACKAGES = {"raytune_ft", "cli", "spec", "model", "search"}  # their __init__ export nothing
# Imports that may go up a layer, each with why. Only the top-level package: every submodule
# import has already run its __init__, which itself imports lazily.
ALLOWED = {
    ("jobs", "raytune_ft"): "the version a job records (raytune_ft.__version__)",
    ("search/cluster", "raytune_ft"): "the version the Ray dashboard's job metadata shows",
}


def _module_name(f: Path) -> str:
    rel = f.relative_to(PKG).with_suffix("")
    return "/".join(p for p in rel.parts if p != "__init__") or "raytune_ft"


def _imports() -> dict[str, dict[str, str]]:
    """{module: {module of ours it imports: "module" or "function" level}}, names as
    docs/architecture.md writes them. Imports under `if TYPE_CHECKING:` are not counted."""
    files = {_module_name(f): f for f in PKG.rglob("*.py")}
    out: dict[str, dict[str, str]] = {}

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("raytune_ft"):
            base = node.module.removeprefix("raytune_ft").lstrip(".").replace(".", "/")
            subs = [f"{base}/{a.name}".lstrip("/") for a in node.names]
            return [sub if sub in files else base or "raytune_ft" for sub in subs]
        if isinstance(node, ast.Import):
            return [a.name.removeprefix("raytune_ft").lstrip(".").replace(".", "/")
                    or "raytune_ft" for a in node.names if a.name.startswith("raytune_ft")]
        return []

    def walk(body: list[ast.stmt], level: str, deps: dict[str, str]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                walk(node.orelse, level, deps)
                continue
            for t in targets(node):
                deps.setdefault(t, level)
            inner = "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                    ast.Lambda)) else level
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    walk([child], inner, deps)
                elif hasattr(child, "body") and isinstance(child.body, list):  # handlers
                    walk(child.body, inner, deps)

    for name, f in files.items():
        deps: dict[str, str] = {}
        walk(ast.parse(f.read_text()).body, "module", deps)
        out[name] = {d: lv for d, lv in deps.items() if d != name}
    return out


def _layers() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    layers = {}
    for line in block.strip().splitlines():
        m = re.match(r"\s*(\d+)\s+(.*?)(\s{2,}\(.*\))?$", line)
        assert m, line
        for name in m.group(2).split(","):
            layers[name.strip()] = int(m.group(1))
    return layers


def test_the_walk_sees_imports_inside_functions() -> None:
    imports = _imports()
    assert {"preflight", "search/trainable", "promote"} <= set(imports["search/run"])
    assert imports["cli/main"]["search/run"] == "function"  # `rtft search` imports Ray late
    assert imports["cli/common"]["spec/yaml_io"] == "function"


def test_every_module_imports_only_from_layers_below() -> None:
    layers, imports = _layers(), _imports()
    placed = set(layers) | PACKAGES
    assert set(imports) <= placed, f"not in docs/architecture.md: {sorted(set(imports) - placed)}"
    assert not set(layers) - set(imports), f"no such module: {sorted(set(layers) - set(imports))}"
    wrong = [f"{m} (layer {layers[m]}) imports {d} (layer {layers.get(d)}) at {lv} level"
             for m, deps in imports.items() if m in layers
             for d, lv in deps.items() if (m, d) not in ALLOWED
             and (d in PACKAGES or layers[d] >= layers[m])]
    assert not wrong, wrong


def test_the_allowlist_is_used() -> None:
    imports = _imports()
    stale = [pair for pair in ALLOWED if pair[1] not in imports.get(pair[0], {})]
    assert not stale, f"ALLOWED names imports the code no longer makes: {stale}"


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


def test_package_inits_export_nothing_of_their_own() -> None:
    """No re-exports for old import paths: a package's __init__ imports no module of ours at
    module level (search/ and spec/ answer only for names old run folders pickled)."""
    for f in PKG.rglob("__init__.py"):
        tree = ast.parse(f.read_text())
        ours = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                and "raytune_ft" in ast.unparse(n)]
        assert not ours, f"{f.relative_to(ROOT)} imports {ours}"


@pytest.mark.parametrize("module", ["raytune_ft.cli.main", "raytune_ft.spec.schema",
                                    "raytune_ft.runs", "raytune_ft.selection", "raytune_ft.tables",
                                    "raytune_ft.search.records", "raytune_ft.spec.yaml_io"])
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
    code = ("import sys; from click.testing import CliRunner; from raytune_ft.cli.main import main; "
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
