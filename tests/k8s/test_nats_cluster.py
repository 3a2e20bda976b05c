"""The nats.conf the chart renders boots a real 3-node JetStream cluster, and an R3 stream
created on it is replicated to all three servers."""

import asyncio
import json
import urllib.request

import nats
import pytest
from nats.js.api import StorageType, StreamConfig

from conftest import one, render
from natscluster import Cluster, server_env

PODS = [f"nb-natsbridge-nats-{i}" for i in range(3)]


# Clustering, not auth, is under test here (test_nats_auth.py boots the default, authenticated
# config): anonymous clients keep these tests about streams and replicas.
NO_AUTH = {"nats": {"auth": {"enabled": False}}}


@pytest.fixture
def cluster():
    objects, _ = render(NO_AUTH)
    conf = one(objects, "ConfigMap", "nb-natsbridge-nats-config")["data"]["nats.conf"]
    # GOMEMLIMIT as the container gets it.
    c = Cluster(conf, PODS, env=server_env(objects)).start()
    try:
        c.wait_healthy()
        yield c
    finally:
        c.stop()


async def create_r3_stream(urls, name, **connect):
    nc = await nats.connect(servers=urls, connect_timeout=5, **connect)
    try:
        js = nc.jetstream(timeout=10)
        # Right after boot the meta group may still be electing; the API answers 503 meanwhile.
        for _ in range(100):
            try:
                info = await js.add_stream(
                    StreamConfig(name=name, subjects=[f"{name.lower()}.>"], num_replicas=3, storage=StorageType.FILE)
                )
                break
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.2)  # retry interval while the meta leader is elected
        else:
            raise AssertionError("JetStream never accepted the stream")
        ack = await js.publish(f"{name.lower()}.created", b"{}", headers={"Nats-Msg-Id": "m-1"})
        dup = await js.publish(f"{name.lower()}.created", b"{}", headers={"Nats-Msg-Id": "m-1"})
        # Replica count and placement come from the leader once every peer has caught up.
        for _ in range(100):
            info = await js.stream_info(name)
            replicas = info.cluster.replicas or []
            if info.cluster.leader and len(replicas) == 2 and all(r.current for r in replicas):
                break
            await asyncio.sleep(0.1)  # poll interval for replica catch-up
        return info, ack, dup
    finally:
        await nc.close()


def test_rendered_conf_boots_a_jetstream_cluster_with_an_r3_stream(cluster):
    info, ack, dup = asyncio.run(create_r3_stream(cluster.client_urls(), "ORDERS"))
    assert info.config.num_replicas == 3
    peers = {info.cluster.leader} | {r.name for r in info.cluster.replicas}
    assert peers == set(PODS), peers
    assert all(r.current for r in info.cluster.replicas)
    assert info.cluster.name == "nb-natsbridge-nats"
    assert ack.seq == 1 and dup.duplicate, "Nats-Msg-Id dedupe works on the rendered config"

    # Every server reports JetStream with the rendered sync_interval policy and limits.
    for i in range(3):
        with urllib.request.urlopen(cluster.monitor(i) + "/varz", timeout=5) as r:
            varz = json.load(r)
        assert varz["server_name"] == PODS[i]
        assert varz["jetstream"]["config"].get("sync_always") is True
        assert varz["jetstream"]["config"]["max_storage"] == 9 * 1024**3
        # Sized from the container's limit (half of 2Gi), not from this host's RAM.
        assert varz["jetstream"]["config"]["max_memory"] == 1024**3
        assert varz["max_payload"] == 1024 * 1024
        with urllib.request.urlopen(cluster.monitor(i) + "/healthz?js-server-only=true", timeout=5) as r:
            assert r.status == 200


def test_dashboard_nats_varz_metrics_exist_on_a_real_server(cluster):
    """prometheus-nats-exporter derives nats_varz_<key> from /varz's numeric keys; the dashboard
    must only use keys a real server reports."""
    from test_dashboard_metrics import dashboard_metric_names

    with urllib.request.urlopen(cluster.monitor(0) + "/varz", timeout=5) as r:
        varz = json.load(r)
    used = {m for m in dashboard_metric_names() if m.startswith("nats_varz_")}
    assert used
    for metric in used:
        key = metric[len("nats_varz_"):]
        assert isinstance(varz.get(key), (int, float)), f"{metric}: /varz has no numeric {key!r}"
