"""A real 2-node Ray cluster on this machine: a head and a second node started as separate
`ray start` processes (own --temp-dir, own process groups, token auth on), then

- `rtft submit --wait` of a small search through the Jobs API (token passed as a header);
- a search whose worker node's raylet is SIGKILLed mid-trial: the trial that ran there is
  retried from its checkpoint on the head node (run.max_failures) and nothing is lost.

Everything started here is stopped by pid in the fixture's finally (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import ROOT, free_port, write_tiny_spec

pytestmark = pytest.mark.cluster


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # /proc/PID/stat: "pid (comm) state ppid …"; comm may contain spaces.
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Ray workers call setsid: not in the node's group)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class LocalCluster:
    port: int
    dashboard: int
    token: str
    temp_dir: Path
    env: dict[str, str]
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dead: list[subprocess.Popen] = field(default_factory=list)  # failed starts, still stopped

    @property
    def jobs_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def api(self, path: str) -> dict:
        req = urllib.request.Request(self.jobs_url + path,
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> int:
        try:
            nodes = self.api("/api/v0/nodes")["data"]["result"]["result"]
        except Exception:
            return 0
        return sum(1 for n in nodes if n["state"] == "ALIVE")

    def start(self, name: str, *args: str) -> None:
        self.args[name] = args
        log = self.temp_dir.parent / f"{name}.log"
        with open(log, "ab") as out:
            self.nodes[name] = subprocess.Popen(
                ["ray", "start", "--block", "--disable-usage-stats", "--num-cpus", "1",
                 "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp_dir),
                 "--dashboard-agent-listen-port", str(free_port()), *args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def wait_nodes(self, n: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        retries = 1
        while self.alive_nodes() < n:
            for name, p in list(self.nodes.items()):
                if p.poll() is None:
                    continue
                # `ray start` gives a node 30 s (hard-coded) to register with the GCS; on a
                # loaded machine that can pass. Start it once more before giving up.
                if retries and name != "head":
                    retries -= 1
                    self.dead.append(p)
                    self.start(name, *self.args[name])
                    continue
                log = (self.temp_dir.parent / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"ray node {name} exited:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} Ray nodes not alive after {timeout:.0f}s")
            time.sleep(0.5)

    def raylet_pid(self, name: str) -> int:
        pids = [p for p in descendants(self.nodes[name].pid) if _comm(p) == "raylet"]
        assert len(pids) == 1, pids
        return pids[0]

    def stop(self) -> None:
        """SIGTERM each node's process group and every descendant, then SIGKILL what is left
        after a short grace (a node drains for up to 30 s on SIGTERM)."""
        pids: list[int] = []
        for p in [*self.dead, *self.nodes.values()]:
            pids += [p.pid, *descendants(p.pid)]
            with _quiet():
                os.killpg(p.pid, signal.SIGTERM)
        for pid in pids:
            with _quiet():
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for p in [*self.dead, *self.nodes.values()]:
            with _quiet():
                os.killpg(p.pid, signal.SIGKILL)
        for pid in pids:
            with _quiet():
                os.kill(pid, signal.SIGKILL)
        for p in [*self.dead, *self.nodes.values()]:
            p.wait(timeout=30)


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)  # type: ignore


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    try:  # a zombie is dead for our purposes
        return state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Head + 1 worker node, 1 CPU each, token auth with a token of our own."""
    # Short: Ray's unix socket paths under the temp dir must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rtc", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    c = LocalCluster(port=free_port(), dashboard=free_port(), token=token,
                     temp_dir=root / "ray", env=env)
    try:
        c.start("head", "--head", "--port", str(c.port), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(c.dashboard),
                "--ray-client-server-port", str(free_port()))
        c.wait_nodes(1)
        c.start("worker", "--address", f"127.0.0.1:{c.port}")
        c.wait_nodes(2)
        yield c
    finally:
        c.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _client_env(cluster: LocalCluster, *, token: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AIR_NEW_OUTPUT": "0"}
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
              "RAY_JOB_HEADERS", "RTFT_JOB_HEADERS"):
        env.pop(k, None)
    if token:  # Ray's own way: it sends the token only when the mode says so
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token)
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    return env


def test_validate_reads_the_clusters_resources(cluster: LocalCluster, tmp_path: Path) -> None:
    spec = write_tiny_spec(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "raytune_ft.cli", "validate", str(spec), "--address",
         cluster.jobs_url, "--header", f"Authorization: Bearer {cluster.token}"],
        env=_client_env(cluster, token=False), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"2 trial(s) fit at once on the Ray cluster at {cluster.jobs_url} (2 CPU, 0 GPU)"
            in proc.stdout)


def test_submit_wait_runs_the_search_as_a_job(cluster: LocalCluster, tmp_path: Path) -> None:
    spec = write_tiny_spec(tmp_path, n=2)
    proc = subprocess.run(
        [sys.executable, "-m", "raytune_ft.cli", "submit", spec.name, "--wait",
         "--address", cluster.jobs_url, "--header", f"Authorization: Bearer {cluster.token}",
         "--set", "train.max_epochs=1", "--set", "scheduler.type=none"],
        cwd=tmp_path, env=_client_env(cluster, token=False), capture_output=True, text=True,
        timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert cluster.token not in out  # the header's value is never printed
    job_id = re.search(r"submitted job (\S+)", out).group(1)
    assert f"job {job_id}: SUCCEEDED" in out
    assert "is shared by all 2 nodes" in out  # the shared-storage check ran, and passed
    promoted = tmp_path / "models" / "tiny" / "v1"
    assert (promoted / "model.safetensors").exists()
    assert json.loads((promoted / "metrics.json").read_text())["test"]["acc"] > 0
    info = cluster.api(f"/api/jobs/{job_id}")  # what the dashboard shows
    assert info["status"] == "SUCCEEDED"
    assert info["entrypoint"].startswith("python -m raytune_ft.cli.job_entry search tiny.yaml")
    assert info["metadata"]["rtft_spec"] == "tiny"


def _trial_pids(tune_dir: Path) -> dict[str, int]:
    """trial dir name → pid of the process that reported its first result."""
    out = {}
    for result in tune_dir.glob("trial_*/result.json"):
        lines = result.read_text().splitlines()
        if lines:
            with _quiet_json():
                out[result.parent.name] = json.loads(lines[0])["pid"]
    return out


class _quiet_json:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], (json.JSONDecodeError, KeyError))


def test_worker_node_dies_mid_search_trials_resume_from_checkpoints(
        cluster: LocalCluster, tmp_path: Path) -> None:
    max_t = 4
    spec = write_tiny_spec(tmp_path, n=2)
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "raytune_ft.cli", "search", str(spec),
             "--address", f"127.0.0.1:{cluster.port}", "--set", "run.max_failures=2",
             "--set", f"train.max_epochs={max_t}", "--set", "scheduler.type=none",
             # a checkpoint every epoch: the kill must find one before the trial's last
             "--set", "run.checkpoint_every=1"],
            cwd=tmp_path, env=_client_env(cluster, token=True), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Wait (bounded) for the first checkpoint of a trial running on the worker node: its
        # process is a child of the worker's raylet.
        raylet = cluster.raylet_pid("worker")
        tune_dir = tmp_path / "runs" / "tiny" / "tune"
        victim = None
        deadline = time.monotonic() + 240
        while victim is None:
            on_worker = set(_children().get(raylet, []))
            for trial, pid in _trial_pids(tune_dir).items():
                if pid in on_worker and any((tune_dir / trial).glob("checkpoint_*/state.pt")):
                    victim = trial
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no trial checkpointed on the worker node"
            time.sleep(0.2)
        os.kill(raylet, signal.SIGKILL)  # the worker node dies; its trial actor goes with it
        assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    text = log.read_text()
    trials = json.loads((tmp_path / "runs" / "tiny" / "trials.json").read_text())
    assert len(trials) == 2, text[-3000:]
    for t in trials:  # nothing lost: every trial finished every epoch, none failed
        assert t["error"] is None, t
        assert [h["epoch"] for h in t["history"]] == list(range(1, max_t + 1)), t["history"]
    # The killed trial was restored from its checkpoint, not restarted: after the restore its
    # first result is past epoch 1 (iterations_since_restore starts over at 1).
    results = [json.loads(line) for line in (tune_dir / victim / "result.json")
               .read_text().splitlines() if line.strip()]
    restored = [r for r in results if r.get("iterations_since_restore") == 1]
    assert len(restored) == 2, results  # the first start, and the restore
    assert restored[1]["training_iteration"] > 1
    assert (tmp_path / "models" / "tiny" / "v1" / "model.safetensors").exists()
