"""Ray itself: start a local Ray or join a cluster, ask it what it has, and prove that a
cluster's storage path is shared by every node."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray.job_config import JobConfig

from raytune_ft.errors import UserError, first_line
from raytune_ft.runs import Echo, RunLocation
from raytune_ft.search.ray_private import loopback_node
from raytune_ft.spec.schema import Spec, check_fit

# Our own progress lines replace Ray's tables; Ray's warning about checkpoint-driven state
# snapshots fires on every epoch of small trials and says nothing actionable.
# Ray snapshots its trial table every >= 10 s by default, and after each trial checkpoint;
# our schedulers add one whenever a trial starts, ends or fails (schedulers.SnapshotOnTrialEnd).
_RAY_ENV = {"RAY_AIR_NEW_OUTPUT": "0",
            "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def ensure_ray(address: str | None, echo: Echo,
               metadata: dict[str, str] | None = None) -> bool:
    """Join `address` (or $RAY_ADDRESS), or start a local Ray; True when we started it.

    `auto` and `host:6379` join as a driver (on a cluster node, or inside a Ray job);
    `ray://host:10001` joins through Ray Client (the Tune loop then runs on the head node, so
    run.storage_path must be storage both sides see). `http://head:8265` is the Jobs API,
    which ray.init cannot join: `rtft search --address http://…` submits a job instead.
    A local Ray listens on 127.0.0.1 only (README, "Operating a search"). `metadata` is the
    driver's job metadata, shown in the dashboard's Jobs view (`job_metadata`).
    """
    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return False
    job_config = JobConfig(metadata=dict(metadata or {}))
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if address.startswith(("http://", "https://")):
            raise UserError(f"{address} is the cluster's dashboard / Jobs API, which a driver "
                            f"cannot join; allowed: `rtft submit SPEC --address {address}` (or "
                            f"`rtft search --address {address}`, which submits a job), 'auto' "
                            f"or host:6379 on a cluster node, ray://host:10001 (Ray Client)")
        try:
            ctx = ray.init(address=address, logging_level=logging.WARNING,
                           job_config=job_config)
        except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as e:
            first = first_line(e)
            hint = (" The cluster uses token authentication: set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token); Ray sends the "
                    "token to an explicit address only then." if "uthenticat" in str(e) else "")
            raise UserError(f"cannot join the Ray cluster at {address}: {first}.{hint}") from e
        echo(f"connected to Ray at {address}"
             + (" (Ray Client: the search loop runs on the head node)"
                if address.startswith("ray://") else ""))
        if not address.startswith("ray://"):  # a client has no node of its own to name
            for line in watch_lines(getattr(ctx, "dashboard_url", None), local=False):
                echo(line)
        return True
    with loopback_node() as on_loopback:
        ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1",
                       logging_level=logging.WARNING, configure_logging=True,
                       job_config=job_config, **on_loopback)
    for line in watch_lines(getattr(ctx, "dashboard_url", None), local=True):
        echo(line)
    return True


def job_metadata(spec: Spec, loc: RunLocation) -> dict[str, str]:
    """The search's job metadata (the dashboard's Jobs view, `rtft jobs status`): run name,
    the run's spec file, its folder, rtft's version; `rtft submit` adds its own."""
    import raytune_ft

    return {"rtft_run": spec.name, "rtft_spec_file": str(loc.local / "spec.yaml"),
            "rtft_run_dir": loc.root, "rtft_version": raytune_ft.__version__}


def auth_hint(env: Mapping[str, str] | None = None) -> str | None:
    """How to open a dashboard that asks for Ray's token: the command that prints it and where
    it lives (never the token itself); None when token auth is off. Read after `ray.init`,
    which turns token auth on for a new local Ray (RAY_AUTH_MODE=token in this process)."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if env.get("RAY_AUTH_TOKEN"):
        where = "it is the value of $RAY_AUTH_TOKEN in rtft's environment"
    elif env.get("RAY_AUTH_TOKEN_PATH"):
        where = f"it is in the file {env['RAY_AUTH_TOKEN_PATH']}"
    else:
        where = "it is in the file ~/.ray/auth_token"
    return (f"token auth is on: the dashboard asks for Ray's token; `ray get-auth-token` "
            f"prints it ({where})")


def watch_lines(dashboard_url: str | None, *, local: bool) -> list[str]:
    """What rtft prints to open the Ray dashboard of the search it runs: the URL, how to
    authenticate, the job, the names the trials go by, the Prometheus endpoint."""
    lines = []
    if dashboard_url:
        lines.append(f"Ray dashboard: http://{dashboard_url}"
                     + ("  (bound to 127.0.0.1)" if local else ""))
        hint = auth_hint()
        if hint:
            lines.append(f"  {hint}")
    lines.append(f"  Jobs: this search is job {ray.get_runtime_context().get_job_id()}; Actors: "
                 f"its trials are RtftTrial, `rtft <run> trial <id>`")
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == here), {})
    if node.get("MetricsExportPort"):
        lines.append(f"  metrics: http://{node.get('NodeManagerAddress')}:"
                     f"{node['MetricsExportPort']}/metrics  (Prometheus; rtft's series are "
                     f"ray_rtft_*; Grafana: cluster/grafana_rtft.json)")
    return lines


def cluster_resources(address: str, headers: Any = None) -> dict[str, float]:
    """Total CPU and GPU of the Ray cluster at `address` (auto, host:6379, ray://…), joined
    briefly as a driver. (`headers` is for the http:// variant in jobs.py; unused here.)"""
    started = ensure_ray(address, lambda _line: None)
    try:
        total = ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
    return {"CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0))}



def _read_probe(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_shared_storage(root: Path, echo: Echo, created: Path | None = None,
                         timeout_s: float = 120.0) -> None:
    """On a cluster with more than one alive node, prove that the local storage path `root`
    is the same storage on every node: write a token file here and read it back with a tiny
    task pinned to each node. Raises UserError (run.storage_path) naming the nodes that cannot,
    after removing `created` (the folders this run created).

    Since Ray 2.7, each trial writes its checkpoints to storage_path from the node it runs on
    and nothing is synced to the head node; with a node-local path the checkpoints end up
    scattered over the nodes and restore/promotion cannot find them, and the old failure was
    confusing (ray issue 37177). So a local path must be shared (NFS, …), or use a URI.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = root / f".rtft-shared-check-{token}"
    probe.write_text(token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        refs = {n["NodeID"]: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe)) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        names = {n["NodeID"]: f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})"
                 for n in nodes}
        bad, unknown = [], []
        for node_id, ref in refs.items():
            if ref not in ready:
                unknown.append(names[node_id])
                continue
            try:
                seen = ray.get(ref)
            except Exception:  # the node died meanwhile: it will not run trials either
                unknown.append(names[node_id])
                continue
            if seen != token:
                bad.append(names[node_id])
    finally:
        probe.unlink(missing_ok=True)
    if bad:
        if created is not None:  # a refused search leaves nothing behind
            shutil.rmtree(created, ignore_errors=True)
        raise UserError(
            f"{root} is not shared storage: this cluster has {len(nodes)} nodes and "
            f"{len(bad)} of them ({', '.join(bad)}) cannot read a file written there by the "
            f"driver. Every trial writes its checkpoints from the node it runs on and Ray no "
            f"longer syncs them to the head node (since Ray 2.7), so results would be "
            f"scattered and lost; allowed: a path mounted at the same place on every node "
            f"(NFS, a shared volume), or an s3://bucket/prefix or gs://bucket/prefix URI",
            field="run.storage_path")
    if unknown:
        echo(f"warning: could not check that {root} is shared on node(s) "
             f"{', '.join(unknown)} within {timeout_s:.0f}s")
    else:
        echo(f"storage: {root} is shared by all {len(nodes)} nodes")


def check_cluster_fit(spec: Spec, created: Path | None) -> None:
    """check_fit against the Ray this process is joined to; on refusal, remove the folders
    the run lock created, so that a refused search leaves nothing behind."""
    try:
        check_fit(spec, ray.cluster_resources(), where="the Ray cluster")
    except UserError:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise

