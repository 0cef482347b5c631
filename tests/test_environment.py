"""The environment (environment.py): what it records, what a difference reads like, the run's
environment.json, and that reading it needs no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, tiny_spec

from raytune_ft import environment
from raytune_ft.environment import DECIDING, DESCRIPTIVE, current, differences


def test_current_records_every_key_and_reads_the_machine_once() -> None:
    env = current(device="cpu", amp="fp32", threads=3)
    assert set(env) == set(DECIDING) | set(DESCRIPTIVE) - {"host"}  # host: the run's only
    import torch

    assert env["torch"] == torch.__version__ and env["threads"] == 3
    assert env["device"] == "cpu" and env["amp"] == "fp32" and env["recorded_by"] == "trial"
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(env["isa"]) <= set(environment.ISA_FLAGS)
    # cuDNN and the GPU change nothing on a CPU: null there, so they never differ.
    assert env["gpu"] is env["cuda"] is env["cudnn"] is env["cudnn_benchmark"] is None
    json.dumps(env)  # plain JSON: it goes into config.json
    assert current(device="cpu")["threads"] == torch.get_num_threads()
    assert environment._machine.cache_info().misses == 1  # once per process


def test_the_cpu_and_its_flags_come_from_proc_cpuinfo() -> None:
    name, flags = environment._cpuinfo()
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo here")
    text = Path("/proc/cpuinfo").read_text()
    assert name is None or name in text
    assert all(f in text for f in flags)


def test_amp_name_is_the_trainers_rule() -> None:
    assert environment.amp_name("cpu", "auto") == "fp32"
    assert environment.amp_name("cuda", "fp32") == "fp32"
    assert environment.amp_name("cpu", "bf16") == "bf16"
    assert environment.amp_name("cuda", "fp16") == "fp16"


def test_differences_name_what_decides_and_ignore_what_describes() -> None:
    was = current(device="cpu", amp="fp32", threads=2)
    assert differences(was, dict(was)) == []
    # ray, optuna, python, os, who recorded it: described, never compared.
    same = {**was, "ray": "0.0.1", "optuna": "0.1", "python": "2.7.18", "os": "Plan 9",
            "recorded_by": "driver"}
    assert differences(was, same) == []
    isa = [f for f in was["isa"] if f != "avx512f"]
    other = {**was, "cpu": "AMD EPYC 9654", "threads": 4, "torch": "9.9.9",
             "isa": [*isa, "sve"]}
    changes = differences({**was, "isa": [*isa, "avx512f"]}, other)
    assert changes == [f"torch: {was['torch']} → 9.9.9", f"cpu: {was['cpu']} → AMD EPYC 9654",
                       "isa: avx512f missing here; sve only here", "threads: 2 → 4"]
    # A key an older rtft did not record is not "the same".
    partial = {k: v for k, v in was.items() if k != "cpu_capability"}
    assert differences(partial, was) == [
        f"cpu_capability: not recorded (here {was['cpu_capability']})"]


def test_the_runs_environment_json_is_written_atomically_and_read_back(
        tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    path = environment.write_run(tmp_path, spec)
    assert path == tmp_path / environment.RUN_FILE
    assert [p.name for p in tmp_path.iterdir()] == [environment.RUN_FILE]  # no temp file left
    env = environment.read_run(tmp_path)
    assert env is not None and env["recorded_by"] == "driver" and env["host"]
    # The trials' device, autocast and threads (one per run.resources.cpu), as they got them.
    assert (env["device"], env["amp"], env["threads"]) == ("cpu", "fp32", 1)
    assert differences(env, environment.for_spec(spec)) == []
    assert environment.read_run(tmp_path / "nowhere") is None
    path.write_text("[not json")
    assert environment.read_run(tmp_path) is None


def test_the_summary_names_software_cpu_threads_and_precision() -> None:
    rows = dict(environment.summary(current(device="cpu", amp="fp32", threads=2)))
    assert "GPU" not in rows  # a CPU trial: no GPU row
    assert rows["device, torch threads"] == "cpu, 2" and rows["precision (autocast)"] == "fp32"
    gpu = {**current(device="cpu"), "device": "cuda", "gpu": "NVIDIA H100", "cuda": "12.4",
           "cudnn": 90100}
    assert dict(environment.summary(gpu))["GPU"] == "NVIDIA H100, CUDA 12.4, cuDNN 90100"


def test_recording_the_environment_imports_no_ray(tmp_path: Path) -> None:
    """environment.py reads Ray's version from its metadata: importing Ray takes a second and
    starts threads, in every trial process that records its environment."""
    code = ("import sys; from raytune_ft import environment; e = environment.current(); "
            "print(e['ray'] is not None, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={**ENV, "HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_python_m_prints_this_machines_environment(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "raytune_ft.environment"], capture_output=True,
                         text=True, cwd=tmp_path, env={**ENV, "HOME": str(tmp_path)},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["torch"]
