"""rtft submit / rtft jobs without a cluster (jobs.py): what a job ships, what it refuses, how
it fails. (Headers and env vars: test_job_env.py; the real Jobs API: test_e2e_cluster.py.)"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import SECRET, write_tiny_spec

from raytune_ft import jobs
from raytune_ft.cli.main import main
from raytune_ft.errors import SpecError


def _spec(tmp_path: Path, extra: str = "") -> Path:
    return write_tiny_spec(tmp_path, extra=extra)


def test_prepare_ships_the_spec_and_relative_files_only(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.pth").write_bytes(b"weights")
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "dataset.bin").write_bytes(b"x" * 1000)  # not named: not shipped
    spec = _spec(tmp_path)
    sub = jobs.prepare(spec.name, ["model.weights=sub/w.pth", "run.num_samples=3"],
                       env_vars={"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "x"})
    try:
        staged = sorted(str(p.relative_to(sub.staging)) for p in sub.staging.rglob("*"))
        assert staged == ["sub", "sub/w.pth", "tiny.yaml"]
        assert (sub.staging / "sub" / "w.pth").read_bytes() == b"weights"
        assert sub.runtime_env["working_dir"] == str(sub.staging)
        assert Path(sub.runtime_env["py_modules"][0]).name == "raytune_ft"
        argv = shlex.split(sub.entrypoint)
        assert argv[:5] == ["python", "-m", "raytune_ft.cli.job_entry", "search", "tiny.yaml"]
        assert argv[5:] == ["--set", "model.weights=sub/w.pth", "--set", "run.num_samples=3"]
        assert sub.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET  # sent…
        assert SECRET not in json.dumps(sub.printable_env())                  # …never shown
    finally:
        jobs.shutil.rmtree(sub.staging)


def test_prepare_leaves_absolute_paths_to_the_cluster(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "abs.pth"
    weights.write_bytes(b"w")
    monkeypatch.chdir(tmp_path)
    sub = jobs.prepare(_spec(tmp_path).name, [f"model.weights={weights}"], ship_code=False)
    try:
        assert sub.assumed == [str(weights)]
        assert not (sub.staging / "abs.pth").exists()
        assert "py_modules" not in sub.runtime_env
    finally:
        jobs.shutil.rmtree(sub.staging)


@pytest.mark.parametrize("override, field", [
    ("run.storage_path=./rtft_runs", "run.storage_path"),
    ("promote.dir=models", "promote.dir"),
])
def test_prepare_refuses_relative_result_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 override: str, field: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as e:
        jobs.prepare(_spec(tmp_path).name, [override])
    assert e.value.field == field and "temporary working folder" in str(e.value)


def test_prepare_refuses_relative_file_outside_the_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "w.pth").write_bytes(b"w")
    (tmp_path / "inner").mkdir()
    spec = _spec(tmp_path)
    monkeypatch.chdir(tmp_path / "inner")
    with pytest.raises(SpecError) as e:
        jobs.prepare(spec, ["model.weights=../w.pth"])
    assert e.value.field == "model.weights"


def test_prepare_ships_a_relative_portfolio_file_and_refuses_one_it_cannot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pf").mkdir()
    (tmp_path / "pf" / "mine.yaml").write_text("configs: [{lr: 0.01}]\n")
    spec = _spec(tmp_path).name
    sub = jobs.prepare(spec, ["searcher.portfolio=pf/mine.yaml"], ship_code=False)
    try:  # shipped at its relative path, where the job's driver starts
        assert sub.shipped == ["tiny.yaml", "pf/mine.yaml"] and not sub.assumed
        assert (sub.staging / "pf" / "mine.yaml").read_text() == "configs: [{lr: 0.01}]\n"
    finally:
        jobs.shutil.rmtree(sub.staging)
    absolute = tmp_path / "pf" / "mine.yaml"
    for name in ("builtin", "none", str(absolute)):  # not files, or the cluster's own
        sub = jobs.prepare(spec, [f"searcher.portfolio={name}"], ship_code=False)
        try:
            assert sub.shipped == ["tiny.yaml"]
            assert sub.assumed == ([str(absolute)] if name == str(absolute) else [])
        finally:
            jobs.shutil.rmtree(sub.staging)
    with pytest.raises(SpecError) as e:  # the job would fail on the cluster: refused here
        jobs.prepare(spec, ["searcher.portfolio=pf/missing.yaml"])
    assert e.value.field == "searcher.portfolio" and "\n" not in str(e.value)
    assert "'pf/missing.yaml' does not exist here" in str(e.value)
    monkeypatch.chdir(tmp_path / "pf")
    with pytest.raises(SpecError) as e:  # outside the current folder: refused like weights
        jobs.prepare(tmp_path / spec, ["searcher.portfolio=../tiny.yaml"])
    assert e.value.field == "searcher.portfolio" and "outside the current folder" in str(e.value)


def test_submit_cli_bad_input_exits_2_before_contacting_anything(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    r = CliRunner().invoke(main, ["submit", str(spec), "--address", "http://127.0.0.1:9",
                                  "--set", "run.storage_path=rel"])
    assert r.exit_code == 2 and "run.storage_path" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["submit", str(spec), "--address", "http://127.0.0.1:9",
                                  "--header", SECRET])
    assert r.exit_code == 2 and SECRET not in r.output


def test_jobs_errors_keep_their_cause_for_debug() -> None:
    with pytest.raises(jobs.JobsError) as e:
        jobs.parse_headers([], env={"RTFT_JOB_HEADERS": "{not json"})
    assert isinstance(e.value.__cause__, json.JSONDecodeError)
    with pytest.raises(jobs.JobsError, match="^cannot reach the Ray Jobs API") as e:
        jobs.client("http://127.0.0.1:9")
    assert e.value.__cause__ is not None and "\n" not in str(e.value)


def test_jobs_cli_unreachable_address_is_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["jobs", "list", "--address", "http://127.0.0.1:9"])
    assert r.exit_code == 2
    assert r.output.startswith("error: cannot reach the Ray Jobs API at http://127.0.0.1:9")
    assert "Traceback" not in r.output
