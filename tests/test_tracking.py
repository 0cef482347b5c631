"""MLflow tracking (`track.mlflow`, raytune_ft/spec/track.py, raytune_ft/search/tracking.py).

The spec section and the dry run's refusals need no server. Everything else runs against a
real `mlflow server` (SQLite backend store, local artifact root, 127.0.0.1, a free port),
started and stopped here, and reads what a real search logged back with MlflowClient: the
parent and child runs, their parameters, the metric histories with the epoch as step, the
registered model versions, and a resume that continues the same runs.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import BASE, free_port, tiny_spec, write_tiny_spec

from raytune_ft.cli.main import main
from raytune_ft.errors import UserError
from raytune_ft.runs import TrialRecord, trial_state
from raytune_ft.spec.yaml_io import parse_spec


# --------------------------------------------------------------------------------------------
# The spec section
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", [
    "http://127.0.0.1:5000", "https://mlflow.example.com", "file:./mlruns", "file:///tmp/x",
    "sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "postgresql+psycopg2://u@db/mlflow",
    "databricks", "databricks://profile",
])
def test_tracking_uris_mlflow_opens_are_accepted(uri: str) -> None:
    spec = parse_spec(BASE, overrides=[f"track.mlflow.uri={uri}"])
    assert spec.track.mlflow is not None and spec.track.mlflow.uri == uri
    assert spec.track.mlflow.experiment is None  # the run's name, at use


@pytest.mark.parametrize("uri, fragment", [
    ("ftp://host/x", "allowed: http(s)://HOST:PORT"),
    ("127.0.0.1:5000", "Did you mean 'http://127.0.0.1:5000'?"),
    ("./mlruns", "A local folder is written 'file:./mlruns'"),
    ("http://", "names no host"),
    ("http://me:secret@host:5000", "MLFLOW_TRACKING_PASSWORD"),
    ("postgresql://me:secret@db/mlflow", "written to the run folder's spec.yaml in clear"),
    ("sqlite://", "in-memory"),
])
def test_bad_tracking_uris_are_refused_naming_the_field(uri: str, fragment: str) -> None:
    with pytest.raises(UserError) as e:
        parse_spec(BASE, overrides=[f"track.mlflow.uri={uri}"])
    assert e.value.field == "track.mlflow.uri"
    assert fragment in str(e.value)
    assert "secret" not in str(e.value)


def test_unknown_track_keys_list_what_is_allowed() -> None:
    with pytest.raises(UserError, match="allowed: uri, experiment, registered_model, registry"):
        parse_spec(BASE + "track: {mlflow: {uri: 'http://h:1', experimnt: x}}\n")
    with pytest.raises(UserError, match="allowed: mlflow"):
        parse_spec(BASE + "track: {wandb: {}}\n")


def test_validate_without_mlflow_installed_says_how_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.chdir(tmp_path)
    spec = write_tiny_spec(tmp_path)
    res = CliRunner().invoke(main, ["validate", str(spec), "--set",
                                    "track.mlflow.uri=http://127.0.0.1:5000"])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and "Traceback" not in res.output
    assert "field 'track.mlflow'" in res.output and "pip install -e '.[mlflow]'" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # nothing written


# --------------------------------------------------------------------------------------------
# A server that cannot be reached, or refuses: one warning line, nothing lost
# --------------------------------------------------------------------------------------------
def _records() -> list[TrialRecord]:
    history = [{"epoch": e, "val_acc": 0.5 + e / 10, "val_loss": 1.0 / e, "train_loss": 1.0}
               for e in (1, 2)]
    return [TrialRecord("t1", {"lr": 0.01}, history), TrialRecord("t2", {"lr": 0.02}, [])]


def _track_against(uri: str, tmp_path: Path) -> tuple[list[str], float]:
    """Feed a tracker a trial's events and the search's end; its lines and the wall time."""
    pytest.importorskip("mlflow")
    from raytune_ft.search.tracking import start_tracking

    lines: list[str] = []
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trials.json").write_text("[]")
    spec = tiny_spec(tmp_path, extra=f"track: {{mlflow: {{uri: '{uri}'}}}}\n")
    t0 = time.monotonic()
    tracker = start_tracking(spec, run_dir, lines.append)
    assert tracker is not None
    tracker.trial_start("t1", {"lr": 0.01})
    tracker.trial_result("t1", {"lr": 0.01}, {"epoch": 1, "val_acc": 0.6})  # returns at once
    tracker.trial_end("t1", failed=False)
    tracker.finish(_records(), [])
    assert sorted(p.name for p in run_dir.iterdir()) == ["trials.json"]  # the run's own files
    return lines, time.monotonic() - t0


@pytest.mark.slow  # ~4 s: MLflow's client retries twice (rtft's default) before giving up
def test_an_unreachable_server_is_one_warning_line(tmp_path: Path) -> None:
    lines, took = _track_against(f"http://127.0.0.1:{free_port()}", tmp_path)
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow tracking stopped"), lines
    assert "no answer (Connection refused)" in lines[0] and "the search goes on" in lines[0]
    assert took < 60


class _Refuse(http.server.BaseHTTPRequestHandler):
    def _no(self) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"forbidden")

    do_GET = do_POST = _no

    def log_message(self, *args: object) -> None:
        pass


def test_a_refusing_server_is_one_warning_line(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        lines, took = _track_against(f"http://127.0.0.1:{server.server_port}", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert len(lines) == 1 and "403" in lines[0] and "the search goes on" in lines[0], lines
    assert took < 30


def test_a_server_that_hangs_never_holds_up_tune(tmp_path: Path) -> None:
    """Tune's loop only queues: a thousand epochs' results cost it well under a millisecond
    each while the server has not answered the first request, and the end of the search waits
    for the server at most the time it is given."""
    pytest.importorskip("mlflow")
    from raytune_ft.search.tracking import start_tracking

    hang = socket.socket()  # accepts connections (the kernel's backlog), never answers
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    uri = f"http://127.0.0.1:{hang.getsockname()[1]}"
    lines: list[str] = []
    try:
        (tmp_path / "run").mkdir()
        spec = tiny_spec(tmp_path, extra=f"track: {{mlflow: {{uri: '{uri}'}}}}\n")
        tracker = start_tracking(spec, tmp_path / "run", lines.append)
        assert tracker is not None
        t0 = time.perf_counter()
        for epoch in range(1, 1001):
            tracker.trial_result("t1", {"lr": 0.01}, {"epoch": epoch, "val_acc": 0.5})
        assert (time.perf_counter() - t0) / 1000 < 1e-3
        t1 = time.monotonic()
        tracker.finish(_records(), [], timeout=1.0)
        assert time.monotonic() - t1 < 5
        assert lines and lines[0].startswith(f"warning: MLflow at {uri} took over 1 s"), lines
    finally:
        hang.close()  # the waiting request fails now, in the tracker's own thread


# --------------------------------------------------------------------------------------------
# A real MLflow server
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 and a free port (SQLite store, local artifacts), ready
    once its /health answers; its whole process group is stopped at the end."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed below)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            try:  # the poll's pause, and it notices a server that died
                proc.wait(timeout=0.25)
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            except subprocess.TimeoutExpired:
                pass
            assert time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _client(url: str):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _runs(url: str, experiment: str) -> tuple[object, list]:
    """The parent run and the child runs of `experiment`."""
    client = _client(url)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


def _check_children(url: str, children: list, trials: list[dict], max_t: int) -> None:
    """One child per trial, with its parameters, every epoch once (step = epoch), its state."""
    client = _client(url)
    by_trial = {c.data.tags["rtft.trial_id"]: c for c in children}
    assert sorted(by_trial) == sorted(t["trial_id"] for t in trials)  # none twice, none missing
    for t in trials:
        child = by_trial[t["trial_id"]]
        assert child.data.params == {k: str(v) for k, v in t["params"].items()}
        hist = client.get_metric_history(child.info.run_id, "val_acc")
        assert [m.step for m in hist] == [h["epoch"] for h in t["history"]]
        assert [m.value for m in hist] == pytest.approx([h["val_acc"] for h in t["history"]])
        record = TrialRecord(**{k: v for k, v in t.items() if k != "cost"})
        assert child.data.tags["rtft.state"] == trial_state(record, max_t)
        assert child.data.metrics["cost_params"] == t["cost"]["params"]
        assert child.info.status == "FINISHED"


@pytest.fixture(scope="module")
def tracked_run(ray_session, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory,  # noqa: ANN001
                backbone_file: Path) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("tracked")
    spec_file = write_tiny_spec(root, n=3, weights=str(backbone_file))
    res = CliRunner().invoke(main, ["search", str(spec_file), "--set",
                                    f"track.mlflow.uri={mlflow_server}"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "warning: MLflow" not in res.output, res.output
    return root, res.output


@pytest.mark.slow
def test_a_search_is_a_parent_run_with_a_child_run_per_trial(tracked_run, mlflow_server: str) -> None:  # noqa: ANN001
    root, _ = tracked_run
    run_dir = root / "runs" / "tiny"
    trials = json.loads((run_dir / "trials.json").read_text())
    parent, children = _runs(mlflow_server, "tiny")  # experiment: the run's name
    saved = json.loads((run_dir / "mlflow.json").read_text())
    assert saved["parent"] == parent.info.run_id and len(saved["children"]) == 3
    assert parent.info.status == "FINISHED" and parent.data.params["name"] == "tiny"
    assert parent.data.metrics["trials"] == 3
    best = max(max(h["val_acc"] for h in t["history"]) for t in trials)
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best)
    _check_children(mlflow_server, children, trials, max_t=2)
    files = {a.path for a in _client(mlflow_server).list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "data.json", "trials.json", "results.txt", "promoted"} <= files


@pytest.mark.slow
def test_the_promoted_model_is_a_registry_version_that_predicts_the_same(
        tracked_run, mlflow_server: str, tmp_path: Path,  # noqa: ANN001
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import torch

    from raytune_ft.data import prepare
    from raytune_ft.promote import load_promoted

    root, _ = tracked_run
    folder = root / "models" / "tiny" / "v1"
    client = _client(mlflow_server)
    [mv] = client.search_model_versions("name = 'tiny'")
    metrics = json.loads((folder / "metrics.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert mv.version == "1" and mv.tags["test_acc"] == str(metrics["test"]["acc"])
    assert json.loads(mv.tags["classes"]) == config["classes"]
    assert json.loads(mv.tags["input_size"]) == [3, 16, 16]
    assert mv.tags["weights_sha256"] == metrics["sha256"] and mv.tags["onnx"] == "false"
    assert mv.description.startswith("# tiny")  # the model card
    # models:/ is resolved by the registry of the tracking URI MLflow is set to
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    got = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny/1",
                                                   dst_path=str(tmp_path / "got")))
    assert {"model.safetensors", "config.json", "metrics.json", "MODEL_CARD.md"} <= \
        {p.name for p in got.iterdir()}
    data = prepare(tiny_spec(root).data)
    x = (data.test_x.float() / 255 - torch.tensor(config["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = load_promoted(folder).model(x), load_promoted(got).model(x)
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_promote_again_and_an_onnx_export_are_new_versions(tracked_run, mlflow_server: str) -> None:  # noqa: ANN001
    pytest.importorskip("onnxruntime")
    from raytune_ft.export import export_model
    from raytune_ft.search.tracking import register_promoted

    root, _ = tracked_run
    run_dir = root / "runs" / "tiny"
    parent_before = json.loads((run_dir / "mlflow.json").read_text())["parent"]
    res = CliRunner().invoke(main, ["promote", str(run_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    v2 = root / "models" / "tiny" / "v2"
    assert v2.is_dir()
    saved = json.loads((run_dir / "mlflow.json").read_text())
    assert saved["parent"] == parent_before  # the same parent run, no new one
    _runs(mlflow_server, "tiny")
    export_model(v2, "onnx")
    out = register_promoted(v2, uri=mlflow_server, name="tiny", run_id=parent_before)
    versions = {m.version: m for m in _client(mlflow_server).search_model_versions("name = 'tiny'")}
    assert sorted(versions) == ["1", "2", "3"] and out["version"] == "3"
    assert versions["3"].tags["onnx"] == "true" and versions["2"].tags["onnx"] == "false"
    files = {a.path.rsplit("/", 1)[-1] for a in _client(mlflow_server).list_artifacts(
        parent_before, "promoted/tiny/v2")}
    assert "model.onnx" in files


def _search_killed_after_one_trial(spec_file: Path, sets: list[str]) -> None:
    """`rtft search` in its own process group, SIGKILLed (with the Ray it started) at the
    first epoch line after a trial has ended."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "raytune_ft.cli", "search", str(spec_file),
                             *sets], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    ended = False
    try:
        for line in proc.stdout:
            if " after epoch " in line:
                ended = True
            elif ended and " epoch " in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ended, "the search ended before a trial did"


@pytest.mark.slow
def test_a_resumed_search_continues_the_same_runs(ray_session, mlflow_server: str,  # noqa: ANN001
                                                  tmp_path: Path, backbone_file: Path) -> None:
    spec_file = write_tiny_spec(tmp_path, n=4, weights=str(backbone_file))
    run_dir = tmp_path / "runs" / "tiny"
    sets = ["--set", f"track.mlflow.uri={mlflow_server}", "--set",
            "track.mlflow.experiment=resumed", "--set", "track.mlflow.registered_model=resumed"]
    _search_killed_after_one_trial(spec_file, sets)
    parent_before = json.loads((run_dir / "mlflow.json").read_text())["parent"]
    _, killed = _runs(mlflow_server, "resumed")  # what the killed search had logged
    assert killed

    res = CliRunner().invoke(main, ["resume", str(run_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and "warning: MLflow" not in res.output

    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials) == 4
    parent, children = _runs(mlflow_server, "resumed")  # one parent: the same one
    assert parent.info.run_id == parent_before and parent.info.status == "FINISHED"
    _check_children(mlflow_server, children, trials, max_t=2)
    assert {c.info.run_id for c in killed} <= {c.info.run_id for c in children}  # continued
    [mv] = _client(mlflow_server).search_model_versions("name = 'resumed'")
    assert mv.run_id == parent_before
