"""examples/platform/k8s: the platform's seven services on Kubernetes. The chart rendered
with the platform's values (routes ConfigMaps and NATS users) and linted, every object and
every Deployment validated against Kubernetes' schemas, the seven injected Deployments
naming a routes ConfigMap the chart ships, each rendered ConfigMap (routes.toml and the
contracts beside it, as the injector mounts it) passing `natsbridge check` with its
contracts found, the routes passing it together, and the values being exactly what
examples/platform/k8s/generate writes from the routes files and contracts."""

import filecmp
import os
import shutil
import subprocess
import tempfile

import helm_python
import kubernetes_validate
import yaml

from conftest import CHART, NAMESPACE, REPO, merge, one, render

K8S = REPO / "examples" / "platform" / "k8s"
KUBE_VERSION = "1.33.0"
CRD_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")
INJECTED = ["gateway", "orchestration", "agent", "tool", "vector", "execution", "model"]


def platform_values():
    with open(K8S / "values.yaml") as f:
        values = yaml.safe_load(f)
    with open(K8S / "nats-users.yaml") as f:
        return merge(values, yaml.safe_load(f))


def binary():
    subprocess.run(["cargo", "build", "-q", "--bin", "natsbridge"], cwd=REPO, check=True, timeout=900)
    return REPO / "target" / "debug" / "natsbridge"


def test_the_chart_renders_the_platform_as_valid_kubernetes():
    report = helm_python.lint(str(CHART), platform_values(), strict=True, namespace=NAMESPACE)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report
    objects, _ = render(platform_values())
    for obj in objects:
        obj = {k: v for k, v in obj.items() if k != "__template"}
        if not obj["apiVersion"].startswith(CRD_GROUPS):
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    for svc in INJECTED:
        cm = one([o for o in objects if o["metadata"].get("namespace") == "platform"], "ConfigMap", f"{svc}-routes")
        assert f'service = "{svc}"' in cm["data"]["routes.toml"]


def test_the_seven_deployments_validate_and_opt_in():
    with open(K8S / "apps.yaml") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    ns = next(d for d in docs if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["natsbridge.io/inject"] == "enabled"
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert sorted(deployments) == sorted(INJECTED)
    routes = {r["name"] for r in platform_values()["routes"]}
    for svc in INJECTED:
        ann = deployments[svc]["spec"]["template"]["metadata"]["annotations"]
        assert ann["natsbridge.io/inject"] == "true" and ann["natsbridge.io/routes"] == f"{svc}-routes" in routes


def test_each_rendered_configmap_passes_check_with_its_contracts():
    """The ConfigMap as the injector mounts it (every key in one folder): routes.toml's
    `schema` lines find their contracts beside it. Without one contract, check fails on it."""
    objects, _ = render(platform_values())
    checked = 0
    for svc in INJECTED:
        cm = one([o for o in objects if o["metadata"].get("namespace") == "platform"], "ConfigMap", f"{svc}-routes")
        schemas = [l.split('"')[1] for l in cm["data"]["routes.toml"].splitlines() if l.startswith("schema = ")]
        assert sorted(schemas) == sorted(k for k in cm["data"] if k != "routes.toml"), svc
        with tempfile.TemporaryDirectory() as d:
            for key, text in cm["data"].items():
                with open(os.path.join(d, key), "w") as f:
                    f.write(text)
            out = subprocess.run([str(binary()), "check", "routes.toml"], cwd=d, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"{svc}: {out.stdout}\n{out.stderr}"
            if schemas:
                os.remove(os.path.join(d, schemas[0]))
                out = subprocess.run([str(binary()), "check", "routes.toml"], cwd=d, capture_output=True, text=True, timeout=60)
                assert out.returncode != 0 and schemas[0] in out.stdout + out.stderr, f"{svc}: a missing contract passed check"
                checked += 1
    assert checked == len(INJECTED) - 1, "every service but vector (which only answers) names contracts"


def test_the_platform_routes_pass_natsbridge_check_together():
    with tempfile.TemporaryDirectory() as d:
        names = []
        for r in platform_values()["routes"]:
            names.append(f'{r["name"]}.toml')
            with open(os.path.join(d, names[-1]), "w") as f:
                f.write(r["toml"])
            for key, text in r.get("files", {}).items():  # the same contract is the same text everywhere
                with open(os.path.join(d, key), "w") as f:
                    f.write(text)
        out = subprocess.run([str(binary()), "check", *names], cwd=d, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"


def test_values_are_what_generate_writes_from_the_routes_files():
    with tempfile.TemporaryDirectory() as d:
        copy = os.path.join(d, "examples", "platform")
        shutil.copytree(REPO / "examples" / "platform" / "routes", os.path.join(copy, "routes"))
        shutil.copytree(REPO / "examples" / "platform" / "contracts", os.path.join(copy, "contracts"))
        shutil.copytree(K8S, os.path.join(copy, "k8s"))
        subprocess.run([os.path.join(copy, "k8s", "generate"), str(binary())], check=True, timeout=60)
        for name in ["values.yaml", "nats-users.yaml"]:
            assert filecmp.cmp(os.path.join(copy, "k8s", name), K8S / name, shallow=False), f"run examples/platform/k8s/generate ({name})"


def test_models_nest_connection_answers_under_the_pods_user_and_nothing_more():
    """model.cjs logs in with its sidecar's Secret (apps.yaml). On a nats-server booted from
    the rendered config, that user answers agent's Nest requests (one reply and Nest's
    dispose message), and is refused a subject the routes do not name."""
    import asyncio
    import base64
    import urllib.parse

    import nats
    from natscluster import Cluster, server_env
    from test_nats_auth import wait_interest

    # One server is enough for core NATS permissions.
    objects, _ = render(merge(platform_values(), {"nats": {"replicas": 1}}))
    conf = one(objects, "ConfigMap", "nb-natsbridge-nats-config")["data"]["nats.conf"]
    apps = list(yaml.safe_load_all(open(K8S / "apps.yaml")))
    model = next(d for d in apps if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "model")
    env = {e["name"]: e for e in model["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env["NATS_URL"]["valueFrom"]["secretKeyRef"]

    def creds(secret):
        url = base64.b64decode(one(objects, "Secret", secret)["data"]["url"]).decode()
        u = urllib.parse.urlsplit(url)
        return u.username, u.password

    (model_user, model_pw), (agent_user, agent_pw) = creds(ref["name"]), creds("agent-routes-nats-auth")
    assert model_user == "model"
    cluster = Cluster(conf, ["nb-natsbridge-nats-0"], env=server_env(objects)).start()

    async def run(url):
        refused = []

        async def on_error(e):
            refused.append(str(e).lower())

        m = await nats.connect(servers=[url], user=model_user, password=model_pw, error_cb=on_error, allow_reconnect=False)
        a = await nats.connect(servers=[url], user=agent_user, password=agent_pw, allow_reconnect=False)
        try:

            async def answer(msg):
                await msg.respond(b'{"id":"1","response":{"key_id":"k"}}')
                await msg.respond(b'{"id":"1","isDisposed":true}')

            await m.subscribe("model.key.requested", cb=answer)
            await m.flush()
            await wait_interest(cluster.monitor(0), "model.key.requested", None)
            reply = await a.request("model.key.requested", b'{"pattern":"model.key.requested","data":{},"id":"1"}', timeout=5)
            assert b'"response"' in reply.data
            await m.flush()
            assert not refused, refused
            await m.publish("agent.execution.completed", b"{}")
            await m.flush()
            for _ in range(50):
                if any('permissions violation for publish to "agent.execution.completed"' in r for r in refused):
                    break
                await asyncio.sleep(0.05)
            assert any('permissions violation for publish to "agent.execution.completed"' in r for r in refused), refused
        finally:
            await m.close()
            await a.close()

    try:
        cluster.wait_healthy()
        asyncio.run(run(cluster.client_urls()[0]))
    finally:
        cluster.stop()
