"""Ray itself (search/cluster.py) without a cluster: joining by an http address, and the
shared-storage probe against a stand-in for Ray. (A real 2-node cluster: test_e2e_cluster.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from raytune_ft.errors import SpecError


def test_search_with_http_address_explains_itself() -> None:
    from raytune_ft.search.cluster import ensure_ray

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        pytest.skip("a Ray is already running in this process")
    with pytest.raises(SpecError, match="rtft submit SPEC --address http://head:8265"):
        ensure_ray("http://head:8265", print)


class _FakeRay:
    """Two alive nodes; node B has its own disk (reads nothing at the path). Stands in for the
    Ray calls of check_shared_storage (the real 2-node pass is in test_e2e_cluster.py)."""

    def __init__(self, readers: dict[str, bool]) -> None:
        self.readers = readers

    def nodes(self) -> list[dict]:
        return [{"NodeID": nid * 56, "Alive": True, "NodeManagerAddress": f"10.0.0.{i}"}
                for i, nid in enumerate(self.readers, 1)] + [
            {"NodeID": "d" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.9"}]

    def remote(self, **_: object):
        fake = self

        class _Fn:
            def __init__(self, fn):
                self.fn, self.node = fn, None

            def options(self, scheduling_strategy):
                f = _Fn(self.fn)
                f.node = scheduling_strategy.node_id[0]
                return f

            def remote(self, path: str):
                return self.fn(path) if fake.readers[self.node] else None

        return _Fn

    def wait(self, refs, num_returns, timeout):
        return refs, []

    def get(self, ref):
        return ref


def test_shared_storage_check_names_the_node_that_cannot_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raytune_ft.errors import SpecError
    from raytune_ft.search import cluster

    monkeypatch.setattr(cluster, "ray", _FakeRay({"a": True, "b": False}))
    created = tmp_path / "runs"
    lines: list[str] = []
    with pytest.raises(SpecError) as e:
        cluster.check_shared_storage(created, lines.append, created)
    assert e.value.field == "run.storage_path"
    assert "10.0.0.2" in str(e.value) and "10.0.0.1" not in str(e.value)
    assert "s3://" in str(e.value) and "2 nodes" in str(e.value)
    assert not created.exists()  # the probe and the folders the run created are gone


def test_shared_storage_check_passes_when_every_node_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raytune_ft.search import cluster

    monkeypatch.setattr(cluster, "ray", _FakeRay({"a": True, "b": True}))
    lines: list[str] = []
    cluster.check_shared_storage(tmp_path, lines.append)
    assert lines == [f"storage: {tmp_path} is shared by all 2 nodes"]
    assert list(tmp_path.iterdir()) == []  # the probe file is removed
