"""Shared helpers for the chart tests: render the chart with the real Helm engine (helm-python-sdk,
Helm v4's Go library) and split the output into Kubernetes objects."""

import copy
import pathlib

import helm_python
import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "natsbridge"
EXAMPLES = CHART / "examples"
RELEASE = "nb"
NAMESPACE = "natsbridge"


def render(values=None, name=RELEASE, namespace=NAMESPACE):
    """Renders the chart and returns (objects, notes): every non-empty YAML document, in
    template order, plus the rendered NOTES.txt."""
    out = helm_python.Chart.load(str(CHART)).render(
        copy.deepcopy(values or {}), name=name, namespace=namespace, is_install=True
    )
    objects, notes = [], ""
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            notes = out[path]
            continue
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(out[path]):
            if doc:
                doc.setdefault("metadata", {})
                doc["__template"] = path
                objects.append(doc)
    return objects, notes


def find(objects, kind, name=None):
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert hits, f"no {kind} {name or ''} rendered"
    return hits


def one(objects, kind, name=None):
    hits = find(objects, kind, name)
    assert len(hits) == 1, f"{len(hits)} {kind} {name or ''} rendered"
    return hits[0]


def merge(base, extra):
    """Helm's merge of several -f files: maps merge key by key, the later file wins."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def example_values():
    """The walkthrough's values: values-orchestration-agent.yaml plus nats-users.yaml (the NATS
    users `natsbridge permissions --format helm-values` generates from its routes), as
    `helm install -f values-orchestration-agent.yaml -f nats-users.yaml` merges them."""
    with open(EXAMPLES / "values-orchestration-agent.yaml") as f:
        values = yaml.safe_load(f)
    with open(EXAMPLES / "nats-users.yaml") as f:
        return merge(values, yaml.safe_load(f))


@pytest.fixture(scope="session")
def default_render():
    return render()
