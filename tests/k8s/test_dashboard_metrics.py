"""Every metric the Grafana dashboard queries exists: natsbridge_* names are exported by the
binary (`natsbridge metrics`), nats_* names by prometheus-nats-exporter run as the chart runs it."""

import json
import os
import re
import subprocess

from conftest import CHART, REPO, find, render

# Histogram series Prometheus derives from one exported family.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# nats_* metrics the exporter's jsz collector emits with -prefix=nats (collector/jsz.go:
# BuildFQName(prefix, "server"|"stream"|"consumer", name)). nats_varz_* names are derived from
# /varz keys and checked against a real server in test_nats_cluster.py.
EXPORTER_JSZ = {
    "nats_server_jetstream_disabled", "nats_server_total_streams", "nats_server_total_consumers",
    "nats_server_total_messages", "nats_server_total_message_bytes", "nats_server_max_memory",
    "nats_server_max_storage", "nats_stream_total_messages", "nats_stream_total_bytes",
    "nats_stream_first_seq", "nats_stream_last_seq", "nats_stream_consumer_count",
    "nats_consumer_delivered_consumer_seq", "nats_consumer_delivered_stream_seq",
    "nats_consumer_num_ack_pending", "nats_consumer_num_redelivered", "nats_consumer_num_waiting",
    "nats_consumer_num_pending", "nats_consumer_ack_floor_stream_seq", "nats_consumer_ack_floor_consumer_seq",
}

METRIC = re.compile(r"\b((?:natsbridge|nats)_[a-zA-Z0-9_]+)\b")


def dashboard():
    with open(CHART / "files" / "dashboard.json") as f:
        return json.load(f)


def queries(node):
    """Every PromQL string in the dashboard: panel targets and templating queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def base_name(metric):
    for suffix in HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def dashboard_metric_names():
    names = set()
    for q in queries(dashboard()):
        # Label values and legends are quoted; only bare identifiers are metric names.
        bare = re.sub(r'"[^"]*"', '""', q)
        names.update(METRIC.findall(bare))
    return names


def exported_names():
    """Runs the real binary: `natsbridge metrics` prints every family it exports."""
    env = dict(os.environ, CARGO_TERM_COLOR="never")
    out = subprocess.run(
        ["cargo", "run", "-q", "--bin", "natsbridge", "--", "metrics"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, f"`natsbridge metrics` failed:\n{out.stderr[-3000:]}"
    names = {line.strip() for line in out.stdout.splitlines() if line.strip()}
    assert names, "`natsbridge metrics` printed nothing"
    return names


def test_dashboard_is_valid_and_covers_the_issue():
    d = dashboard()
    assert d["uid"] == "natsbridge"
    titles = " | ".join(p["title"] for p in d["panels"]).lower()
    for topic in ["connections", "messages", "bytes", "stream", "consumer lag", "request rate", "latency",
                  "status", "ack / nak / term / dlq", "idempotency", "reconnects", "components down"]:
        assert topic in titles, f"no panel about {topic!r}"
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_every_natsbridge_metric_in_the_dashboard_is_exported_by_the_binary():
    used = {base_name(m) for m in dashboard_metric_names() if m.startswith("natsbridge_")}
    assert len(used) >= 15, used
    exported = exported_names()
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries metrics the binary does not export: {missing}\nexported: {sorted(exported)}"


def test_every_nats_metric_in_the_dashboard_comes_from_the_exporter():
    used = {m for m in dashboard_metric_names() if m.startswith("nats_")}
    unknown = sorted(m for m in used if not m.startswith("nats_varz_") and m not in EXPORTER_JSZ)
    assert not unknown, f"not exporter metrics: {unknown}"


def test_dashboard_configmap_carries_the_file_and_the_sidecar_label(default_render):
    objects, _ = default_render
    cm = find(objects, "ConfigMap", "nb-natsbridge-dashboard")[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["natsbridge.json"]) == dashboard()


def test_prometheus_rule_is_off_by_default_and_alerts_on_exported_metrics(default_render):
    objects, _ = default_render
    assert not [o for o in objects if o["kind"] == "PrometheusRule"]
    objects, _ = render({"monitoring": {"prometheusRule": {"enabled": True, "componentDownFor": "10m", "labels": {"release": "kps"}}}})
    (rule,) = find(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"NatsbridgeComponentDown", "NatsbridgeNatsDisconnected"}
    assert alerts["NatsbridgeComponentDown"]["for"] == "10m"
    assert alerts["NatsbridgeNatsDisconnected"]["for"] == "2m"
    # Prometheus templates pass through Helm unexpanded.
    assert "{{ $labels.component }}" in alerts["NatsbridgeComponentDown"]["annotations"]["summary"]
    used = {m for r in alerts.values() for m in METRIC.findall(r["expr"])}
    assert used == {"natsbridge_component_up", "natsbridge_nats_connected"}
    assert not used - exported_names()
