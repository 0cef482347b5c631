"""A new user's view of a running search from Ray's dashboard and metrics (issue #16).

One real `rtft search` runs in a subprocess (its own Ray temp folder and token) while this module
looks at it from outside, as a user would, from what rtft prints: the start lines, the listening
sockets of its process tree, the Prometheus endpoint, the dashboard's Jobs and Actors, the log
prefixes of its trials. tests/plugins/hold holds the first trial to reach its second epoch before
it reports it, while the search runs its other trials to their end, until the module has looked
(every process of the search stays up meanwhile), then lets it end.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import ENV, ROOT, free_port, write_tiny_spec

from raytune_ft.search.cluster import auth_hint
from raytune_ft.search.metrics import STATES

# What a local search may still bind beyond loopback, with what protects it (docs/operating.md,
# "What listens", holds the same list). Keys: the process name as psutil reads it.
# Ray 2.60 binds everything to 127.0.0.1 once the node address is 127.0.0.1: nothing is left.
NON_LOOPBACK_ALLOWED: dict[str, str] = {}

GRAFANA = ROOT / "cluster" / "grafana_rtft.json"
LOOPBACK = ("127.", "::1", "::ffff:127.")
DEADLINE_S = 240.0


@dataclass
class LiveSearch:
    proc: subprocess.Popen
    folder: Path  # the hold plugin's folder
    token: str
    lines: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def wait_for(self, pattern: str, deadline: float) -> re.Match:
        """The first output line matching `pattern`, waiting for it to be printed."""
        rx = re.compile(pattern)
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if m := rx.search(line):
                    return m
            seen = len(self.lines)
            if self.done.wait(0.2) and seen == len(self.lines):
                break
        pytest.fail(f"no line matching {pattern!r}; output:\n" + "".join(self.lines))

    def get(self, url: str) -> dict:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


def _read(proc: subprocess.Popen, live: LiveSearch) -> None:
    for line in proc.stdout:
        live.lines.append(line)
    live.done.set()


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{series name: [(labels, value)]} of a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _by_state(scrape: dict) -> dict[str, float]:
    return {labels["state"]: v for labels, v in scrape.get("ray_rtft_trials", [])
            if labels.get("run") == "tiny"}


def _tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _listeners(pid: int) -> list[tuple[str, int, str, str]]:
    """(process name, pid, address, kind) of every TCP listener and bound UDP socket of the
    process tree under `pid` (the driver, and the Ray it started)."""
    import psutil

    out = []
    for p in _tree(pid):
        try:
            name, conns = p.name(), p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.type == 1 and c.status != psutil.CONN_LISTEN:  # TCP, not listening
                continue
            if c.type == 2 and c.raddr:  # UDP, connected to a peer
                continue
            out.append((name, p.pid, f"{c.laddr.ip}:{c.laddr.port}",
                        "tcp" if c.type == 1 else "udp"))
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSearch]:
    root = tmp_path_factory.mktemp("dashboard")
    spec_file = write_tiny_spec(root, n=4)
    folder = root / "hold"
    folder.mkdir()
    # Ray's sockets live under its temp folder: a short private one (a Unix socket path has
    # at most 107 bytes), so that this Ray never meets another on the machine.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rtft-dash-", dir="/tmp"))
    token = secrets.token_hex(16)
    env = {**{k: v for k, v in ENV.items() if not k.startswith("RAY_AUTH")},
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "plugins" / "hold"),
                                          ENV["PYTHONPATH"]]),
           "RTFT_TEST_HOLD": str(folder), "RAY_TMPDIR": str(ray_tmp),
           # Token auth as Ray turns it on for a new local cluster (RAY_AUTH_MODE unset), with
           # this test's own token rather than the user's ~/.ray/auth_token.
           "RAY_AUTH_TOKEN": token,
           "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1",
           "RTFT_CACHE": os.environ.get("RTFT_CACHE", str(root / "cache"))}
    proc = subprocess.Popen([sys.executable, "-m", "raytune_ft.cli", "search", str(spec_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=root, start_new_session=True)
    search = LiveSearch(proc, folder, token)
    threading.Thread(target=_read, args=(proc, search), daemon=True).start()
    try:
        yield search
    finally:
        (folder / "release").touch()
        try:
            proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def held(live: LiveSearch) -> dict:
    """The search as the user sees it while one trial is held before its second epoch's report
    and the other three have ended: the start lines' URLs, the sockets, a metrics scrape, Jobs,
    Actors."""
    deadline = time.monotonic() + DEADLINE_S
    dash = live.wait_for(r"Ray dashboard: (http://\S+)", deadline).group(1)
    metrics_url = live.wait_for(r"metrics: (http://\S+/metrics)", deadline).group(1)
    while not (live.folder / "held").exists():
        assert live.proc.poll() is None, "the search ended before a trial was held:\n" \
            + "".join(live.lines)
        live.done.wait(0.2)
        assert time.monotonic() < deadline, "".join(live.lines)
    trial = (live.folder / "held").read_text()

    def standing_still(scrape: dict) -> bool:
        """The held trial's first epoch in, the other three trials ended."""
        return _by_state(scrape).get("running") == 1 and any(
            labels.get("trial") == trial
            for labels, _ in scrape.get("ray_rtft_trial_epoch_seconds", []))

    # Ray exports metrics every 10 s, and a busy machine's dashboard may answer late or with
    # an error: ask again until the answer is there, within the deadline.
    scrape = _until(deadline, live, lambda: _scrape(metrics_url), standing_still)
    return {"dashboard": dash, "metrics_url": metrics_url, "trial": trial, "scrape": scrape,
            "sockets": _listeners(live.proc.pid),
            "jobs": _until(deadline, live, lambda: live.get(f"{dash}/api/jobs/")),
            "actors": _until(deadline, live,
                             lambda: live.get(f"{dash}/api/v0/actors?detail=1&limit=1000"),
                             lambda a: a.get("result") is True)}


def _until(deadline: float, live: LiveSearch, ask: Callable[[], Any],
           ok: Callable[[Any], bool] = lambda _: True) -> Any:
    """`ask()`'s first answer that is `ok`, asking again (each second) after an answer that is
    not or a connection error, until `deadline`."""
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = ask()
            if ok(last):
                return last
        except (OSError, ValueError, http.client.HTTPException) as e:  # refused, 5xx, cut short
            last = e
        assert live.proc.poll() is None, "".join(live.lines)
        live.done.wait(1.0)
    pytest.fail(f"no answer in time; the last: {last!r:.2000}")


@pytest.fixture(scope="module")
def finished(live: LiveSearch, held: dict) -> LiveSearch:
    (live.folder / "release").touch()
    assert live.proc.wait(timeout=DEADLINE_S) == 0, "".join(live.lines)
    live.done.wait(30)
    return live


@pytest.mark.slow
def test_start_lines_say_how_to_open_the_dashboard(live: LiveSearch, held: dict) -> None:
    out = "".join(live.lines)
    assert held["dashboard"].startswith("http://127.0.0.1:")
    assert "`ray get-auth-token`" in out and "$RAY_AUTH_TOKEN" in out
    assert live.token not in out  # where the token is, never the token
    assert held["metrics_url"].startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_a_local_search_listens_on_loopback_only(held: dict) -> None:
    sockets = held["sockets"]
    names = {name for name, _, _, _ in sockets}
    # The search's own servers are there to be checked: the GCS, the raylet, the workers.
    assert {"gcs_server", "raylet"} <= names, sockets
    wild = [s for s in sockets if not s[2].startswith(LOOPBACK) and s[0] not in
            NON_LOOPBACK_ALLOWED]
    assert not wild, f"listening beyond loopback: {wild}"


@pytest.mark.slow
def test_metrics_endpoint_carries_the_search(held: dict) -> None:
    s = held["scrape"]

    def values(name: str, **want: str) -> list[float]:
        return [v for labels, v in s.get(name, [])
                if labels.get("run") == "tiny" and all(labels.get(k) == w
                                                       for k, w in want.items())]

    assert values("ray_rtft_trials_planned") == [4]
    # One trial is held before its second epoch's report; the other three have ended. Every
    # state's series is there, 0 included.
    by_state = _by_state(s)
    assert set(by_state) == set(STATES), by_state
    assert by_state["running"] == 1 and by_state["failed"] == by_state["retrying"] == 0
    assert by_state["completed"] + by_state["stopped"] + by_state["diverged"] == 3
    assert sum(values("ray_rtft_trials_stopped_total")) == by_state["stopped"]
    [best] = values("ray_rtft_best_metric", metric="val_acc")
    assert 0.0 < best <= 1.0
    [epochs] = values("ray_rtft_epochs_finished_total")
    assert 4 <= epochs <= 3 * 2 + 1  # each trial at least one epoch, the held one one
    [count] = values("ray_rtft_epoch_seconds_count")
    assert count == epochs
    [total] = values("ray_rtft_epoch_seconds_sum")
    assert 0 < total < 600 * epochs
    # Per-trial series: the running trial's (an ended trial's leave the endpoint).
    [secs] = values("ray_rtft_trial_epoch_seconds", trial=held["trial"])
    assert 0 < secs < 600
    [acc] = values("ray_rtft_trial_metric", metric="val_acc", trial=held["trial"])
    assert 0.0 <= acc <= best


@pytest.mark.slow
def test_dashboard_names_the_search_and_its_trials(held: dict) -> None:
    jobs = [j for j in held["jobs"] if (j.get("metadata") or {}).get("rtft_run") == "tiny"]
    assert len(jobs) == 1, held["jobs"]
    meta = jobs[0]["metadata"]
    assert meta["rtft_version"] and meta["rtft_run_dir"].endswith("/runs/tiny")
    assert meta["rtft_spec_file"].endswith("/runs/tiny/spec.yaml")
    actors = held["actors"]["data"]["result"]["result"]
    trials = [a for a in actors if a["class_name"] == "RtftTrial"]
    assert trials, [a["class_name"] for a in actors]
    # Ray sets an actor's Repr once: a reused actor's is its first trial's.
    assert all(re.fullmatch(r"rtft tiny trial [0-9a-f]+", a["repr_name"]) for a in trials), trials


@pytest.mark.slow
def test_a_real_prometheus_answers_every_query_of_the_grafana_dashboard(
        live: LiveSearch, held: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("no prometheus on PATH (optional here: apt-get install prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    target = held["metrics_url"].removeprefix("http://").removesuffix("/metrics")
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['{target}']}}]}}]\n")
    port = free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={folder / 'prometheus.yml'}",
                             f"--storage.tsdb.path={folder / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(expr: str) -> dict:
            url = (f"http://127.0.0.1:{port}/api/v1/query?"
                   + urllib.parse.urlencode({"query": expr}))
            with urllib.request.urlopen(url, timeout=30) as r:
                return json.loads(r.read())

        deadline = time.monotonic() + DEADLINE_S
        # rate() needs two scrapes of a series: wait until there are three.
        _until(deadline, live, lambda: query("count_over_time(ray_rtft_trials_planned[1m])"),
               lambda r: r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) >= 3)
        board = json.loads(GRAFANA.read_text())
        for panel in board["panels"]:
            for t in panel["targets"]:
                expr = (t["expr"].replace("$SessionName", ".*").replace("$run", "tiny")
                        .replace("$window", "1m"))
                answer = query(expr)
                assert answer["status"] == "success", (panel["title"], expr, answer)
                # Every series is there but ASHA's stops, which exist once a trial is stopped.
                if "trials_stopped" not in expr:
                    assert answer["data"]["result"], (panel["title"], expr)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_log_prefixes_follow_each_trial_on_a_reused_actor(finished: LiveSearch) -> None:
    # "(rtft tiny trial <id> pid=…) rtft-test: trial <id> epoch <n>", printed by the trial.
    rx = re.compile(r"\(rtft tiny trial (\S+) pid=(\d+)\) rtft-test: trial (\S+) epoch")
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in finished.lines]  # Ray's colours
    seen = [m.groups() for line in lines if (m := rx.search(line))]
    plain = [line for line in lines if "rtft-test:" in line and not rx.search(line)]
    assert not plain, plain  # every trial line carries an rtft prefix
    assert seen and all(prefix == trial for prefix, _, trial in seen), seen
    per_pid: dict[str, set[str]] = {}
    for _, pid, trial in seen:
        per_pid.setdefault(pid, set()).add(trial)
    assert len({t for _, _, t in seen}) == 4
    assert any(len(t) > 1 for t in per_pid.values()), per_pid  # an actor served two trials


def test_auth_hint_names_the_command_and_where_the_token_is() -> None:
    assert auth_hint({}) is None
    assert auth_hint({"RAY_AUTH_MODE": "disabled"}) is None
    default = auth_hint({"RAY_AUTH_MODE": "token"})
    assert "`ray get-auth-token`" in default and "~/.ray/auth_token" in default
    path = auth_hint({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/secrets/ray"})
    assert "/secrets/ray" in path
    env = auth_hint({"RAY_AUTH_MODE": "TOKEN", "RAY_AUTH_TOKEN": "s3cr3t"})
    assert "$RAY_AUTH_TOKEN" in env and "s3cr3t" not in env


def test_trials_run_as_a_named_class_that_restores_under_its_old_name(tmp_path: Path) -> None:
    from ray.tune.experiment import Experiment

    from raytune_ft.data import prepare
    from raytune_ft.search.trainable import trainable_for
    from raytune_ft.spec.yaml_io import load_spec

    spec = load_spec(write_tiny_spec(tmp_path))
    cls = trainable_for(spec, prepare(spec.data))
    assert cls.__name__ == cls.__qualname__ == "RtftTrial"  # the dashboard's Actors "Class"
    # Tune records this name in a run's tuner.pkl and Tuner.restore refuses another: runs
    # written by rtft 0.1.0 recorded "_trainable".
    assert Experiment.get_trainable_name(cls) == "_trainable"
    assert cls.default_resource_request({}) is not None  # run.resources still reach Tune
