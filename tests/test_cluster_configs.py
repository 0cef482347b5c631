"""cluster/: the launcher config validates against Ray's own schema, the KubeRay manifests
carry what KubeRay needs, the scripts parse, and cluster/local.sh really starts and stops a
2-node Ray cluster (only its own processes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, free_port

CLUSTER = ROOT / "cluster"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_launcher_config_validates_against_rays_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.aws.yaml").read_text())
    jsonschema.validate(config, schema)
    # The schema allows much; what rtft relies on is checked here.
    gpu_types = [t for t in config["available_node_types"].values()
                 if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "a GPU worker type"
    assert config["head_node_type"] in config["available_node_types"]
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "raytune-ft" in setup
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start


def test_launcher_schema_check_has_teeth() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.aws.yaml").read_text())
    del config["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_raycluster_has_what_kuberay_needs() -> None:
    docs = {d["kind"]: d for d in _docs(CLUSTER / "kuberay" / "raycluster.yaml")}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never exposed publicly
    assert spec["workerGroupSpecs"]
    for group in [head, *spec["workerGroupSpecs"]]:
        assert "rayStartParams" in group
        for c in _containers(group["template"]):
            assert c["image"]
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
            for c in _containers(g["template"])]
    assert any(gpus)
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kuberay_rayjob_runs_the_search_and_shuts_down() -> None:
    (job,) = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("rtft search search_spaces/resnet.yaml")
    assert (ROOT / "search_spaces" / "resnet.yaml").exists()
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert "rayStartParams" in cluster["headGroupSpec"]
    assert all("rayStartParams" in g for g in cluster["workerGroupSpecs"])
    # Results must outlive the pods: storage and models on the shared volume.
    assert "run.storage_path=/shared/" in spec["entrypoint"]
    assert "promote.dir=/shared/" in spec["entrypoint"]
    mounts = [m["mountPath"] for c in _containers(cluster["headGroupSpec"]["template"])
              for m in c.get("volumeMounts", [])]
    assert "/shared" in mounts


@pytest.mark.parametrize("script", ["local.sh", "slurm/rtft.sbatch"])
def test_scripts_parse(script: str) -> None:
    path = CLUSTER / script
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_sbatch_starts_head_then_workers_and_tears_down() -> None:
    text = (CLUSTER / "slurm" / "rtft.sbatch").read_text()
    assert re.search(r"ray start --head --block", text)
    assert re.search(r"ray start --block --address", text)
    assert "trap teardown EXIT" in text
    assert "ray stop" not in text.replace("`ray stop`", "")  # never machine-wide
    assert re.search(r"^rtft search \"\$SPEC\" --address", text, re.M)


def _pids_under(directory: str) -> set[int]:
    """Processes whose command line names `directory` (the cluster's own temp dir)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if directory in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    out.add(int(entry.name))
            except OSError:
                continue
    return out


@pytest.mark.cluster
def test_local_sh_starts_a_head_and_a_worker_and_stops_only_them() -> None:
    state = tempfile.mkdtemp(prefix="rtl", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RTFT_LOCAL_DIR": state, "RTFT_LOCAL_PORT": str(free_port()),
           "RTFT_LOCAL_DASHBOARD_PORT": str(free_port()),
           "RTFT_LOCAL_CLIENT_PORT": str(free_port()), "RTFT_LOCAL_GRACE_S": "3"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    script = str(CLUSTER / "local.sh")
    try:
        up = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                            timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "2-node Ray cluster up" in up.stdout
        assert f"http://127.0.0.1:{env['RTFT_LOCAL_DASHBOARD_PORT']}" in up.stdout
        assert oct(os.stat(Path(state) / "auth_token").st_mode & 0o777) == "0o600"
        status = subprocess.run([script, "status"], env=env, capture_output=True, text=True,
                                timeout=120)
        lines = [ln for ln in status.stdout.splitlines() if " alive " in ln]
        assert len(lines) == 2 and sum("(head)" in ln for ln in lines) == 1, status.stdout
        assert _pids_under(state)  # its raylets, GCS, … run with our temp dir
    finally:
        down = subprocess.run([script, "stop"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not _pids_under(state), "local.sh stop left processes behind"
    assert not list(Path(state).glob("*.pid"))
    subprocess.run(["rm", "-rf", state], check=False)
