"""Helpers shared by test files: `from helpers import tiny_spec, ROOT, …`.

pytest puts `tests/` on sys.path (the folder above the first test file's package, as for
conftest.py), so this module imports the same way from `tests/test_*.py` and from
`tests/search/test_*.py`. Fixtures live in conftest.py; plain functions and constants here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from raytune_ft.spec.schema import Spec
from raytune_ft.spec.yaml_io import parse_spec

# The checkout's root (where raytune_ft/, search_spaces/, bench/ and cluster/ are).
ROOT = Path(__file__).resolve().parents[1]

# The environment for an rtft child process: never a cluster from the caller's RAY_ADDRESS,
# and this checkout importable.
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

# The smallest spec text that loads: tests append one section to it.
BASE = "name: t\n"

# A secret value that must never be echoed (headers, env vars of a job).
SECRET = "s3cr3t-t0ken-value"

TINY_SPEC = """\
name: tiny
model: {{arch: resnet18, weights: {weights}}}
data: {{source: digits, image_size: 16, train_limit: 160, val_fraction: 0.15, test_fraction: 0.15}}
train: {{max_epochs: 2, seed: 0}}
search:
  lr: {{space: loguniform, low: 1.0e-3, high: 1.0e-2}}
  optimizer: {{space: choice, values: [sgd, adamw]}}
  momentum: {{space: uniform, low: 0.8, high: 0.95, when: {{optimizer: sgd}}}}
  freeze_depth: {{space: int, low: 0, high: 2}}
  batch_size: 32
  augment: none
searcher: {{sampler: tpe, seed: 0, n_startup_trials: 2}}
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
run: {{num_samples: {n}, max_concurrent_trials: 2, storage_path: {root}/runs}}
promote: {{dir: {root}/models}}
"""


def tiny_spec(root: Path, *, n: int = 4, weights: str = "none", extra: str = "") -> Spec:
    return parse_spec(TINY_SPEC.format(root=root, n=n, weights=weights) + extra,
                      file="tiny.yaml")


def write_tiny_spec(root: Path, **kw: object) -> Path:
    path = root / "tiny.yaml"
    path.write_text(TINY_SPEC.format(root=root, n=kw.get("n", 4),
                                     weights=kw.get("weights", "none")) + str(kw.get("extra", "")))
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny(spec: Spec, hp: object, dest: Path, data: object = None) -> list[dict]:
    """Train `hp` on `spec` with the plain trainer, as one trial would, copying each epoch's
    checkpoint folder to `dest` (a made-up trial's `best_checkpoint`); the reported history."""
    import shutil

    from raytune_ft.data import prepare
    from raytune_ft.train import train

    history: list[dict] = []

    def report(m: dict, folder: Path | None) -> None:
        history.append(m)
        if folder is not None:
            shutil.copytree(folder, dest, dirs_exist_ok=True)

    train(hp, spec=spec, data=data if data is not None else prepare(spec.data), report=report)
    return history


def fake_teacher(root: Path, classes: list[str], image_size: int | None = None) -> Path:
    """`root/teacher`, shaped as promotion writes a model folder (config, metrics with the
    weights' sha256, the weights' bytes): enough for the dry run, which loads no model."""
    import hashlib
    import json

    folder = root / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"classes": classes, "spec": {"data": {"image_size": image_size}}}))
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "metrics.json").write_text(json.dumps(
        {"sha256": hashlib.sha256(b"weights").hexdigest()}))
    return folder


def run_instant_driver(code: str, args: list[str], *, cwd: Path,
                       timeout: float) -> tuple[int, str, dict]:
    """Run `python -c code args…` in its own session with rtft's trainer replaced by the
    instant one (bench/plugins/instant_trainer), its own short Ray temp folder and token; wait
    until no process that inherited its marked environment is left (ray.shutdown() returned:
    what Ray started goes with it), assert none is, and kill what is on failure.
    (returncode, output, the JSON of its `OUTCOME ` line or {})."""
    import json
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import uuid

    marker = uuid.uuid4().hex
    # Ray's sockets live under its temp folder: a short private one (a Unix socket path has at
    # most 107 bytes), so that this Ray never meets another on the machine.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rtft-drv-", dir="/tmp"))
    env = {**{k: v for k, v in ENV.items() if not k.startswith("RAY_AUTH")},
           "PYTHONPATH": os.pathsep.join([str(ROOT / "bench" / "plugins" / "instant_trainer"),
                                          ENV["PYTHONPATH"]]),
           "RTFT_BENCH_INSTANT": "0", "RTFT_TEST_DRIVER": marker,
           "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_TOKEN": uuid.uuid4().hex,  # not ~/.ray's
           "RTFT_CACHE": os.environ.get("RTFT_CACHE", str(cwd / "cache"))}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        deadline = time.monotonic() + 15
        while (left := _marked(marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in _marked(marker):
            p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next((x for x in out.splitlines() if x.startswith("OUTCOME ")), None)
    return proc.returncode, out, json.loads(line[len("OUTCOME "):]) if line else {}


def _marked(marker: str) -> list:
    """The live processes whose environment carries `marker` (every process the driver
    started, however: the environment is inherited)."""
    import psutil

    out = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RTFT_TEST_DRIVER") == marker:
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out
