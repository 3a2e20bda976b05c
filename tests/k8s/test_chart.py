"""The chart, rendered by the real Helm engine for default and non-default values: lint, schema
validation of every object against Kubernetes' own schemas, and what each part must carry."""

import base64
import datetime
import os
import subprocess
import tempfile

import helm_python
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from conftest import CHART, EXAMPLES, NAMESPACE, REPO, example_values, find, one, render

KUBE_VERSION = "1.33.0"
# Kinds from CRDs, which kubernetes-validate has no schemas for.
CRD_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")

NON_DEFAULT = {
    "fullnameOverride": "bridge",
    "commonLabels": {"team": "platform"},
    "imagePullSecrets": [{"name": "regcred"}],
    "clusterDomain": "corp.internal",
    "image": {"repository": "registry.example.com/natsbridge", "tag": "9.9.9", "pullPolicy": "Always"},
    "nats": {
        "replicas": 5,
        "jetstream": {"syncInterval": "10s", "maxMemoryStore": "1Gi", "pvc": {"size": "50Gi", "storageClassName": "fast-ssd"}},
        "auth": {"enabled": True, "existingSecret": "nats-auth", "users": {"solo": {"publish": ["solo.>"], "subscribe": []}}},
        "tls": {"enabled": True, "secretName": "nats-tls", "verify": True},
        "exporter": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "networkPolicy": {"extraClients": [{"namespaceSelector": {"matchLabels": {"nats-clients": "true"}}}]},
    },
    "injector": {
        "failurePolicy": "Ignore",
        "replicas": 3,
        # Helm merges maps with the defaults; null removes the default label.
        "namespaceSelector": {"matchLabels": {"natsbridge.io/inject": None, "mesh": "nats"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["apps"]}]},
        "sidecar": {"resources": {"cpuLimit": "1", "memoryLimit": ""}, "extraNoProxy": ["10.96.0.1"], "logLevel": "debug"},
        "certificate": {"certManager": {"enabled": True}},
    },
    "routes": [{"name": "solo-routes", "toml": "[sidecar]\nservice = \"solo\"\n"}],
    "provision": {"extraArgs": ["--force"]},
    "monitoring": {"dashboard": {"namespace": "grafana"}, "podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True},
                   "prometheusRule": {"enabled": True}},
}

CASES = {"default": {}, "non-default": NON_DEFAULT, "example": None, "external-nats": {
    "nats": {"enabled": False, "externalUrl": "nats://nats.shared:4222"},
    "injector": {"certificate": {"certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}},
}}


def case_values(name):
    return example_values() if name == "example" else CASES[name]


def test_lint_is_clean():
    report = helm_python.lint(str(CHART), strict=True, namespace=NAMESPACE)
    assert not report["errors"], report
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert not bad, bad


def test_lint_with_example_values_is_clean():
    report = helm_python.lint(str(CHART), example_values(), strict=True, namespace=NAMESPACE)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_object_is_valid_kubernetes(case):
    objects, notes = render(case_values(case))
    assert objects and notes.strip()
    checked = 0
    for obj in objects:
        obj = {k: v for k, v in obj.items() if k != "__template"}
        ident = f'{obj["kind"]}/{obj["metadata"].get("name")}'
        assert obj["metadata"].get("name"), ident
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{case}: {ident}: {e}")
        checked += 1
    assert checked >= 5


def test_names_are_unique_per_kind_and_namespace():
    for case in CASES:
        objects, _ = render(case_values(case))
        seen = set()
        for o in objects:
            key = (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
            assert key not in seen, (case, key)
            seen.add(key)


def test_nats_statefulset(default_render):
    objects, _ = default_render
    sts = one(objects, "StatefulSet")
    spec = sts["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == "nb-natsbridge-nats-headless"
    pod = spec["template"]["spec"]
    nats = next(c for c in pod["containers"] if c["name"] == "nats")
    assert nats["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert nats["readinessProbe"]["httpGet"]["path"] == "/healthz?js-server-only=true"
    assert nats["livenessProbe"]["httpGet"]["path"] == "/healthz?js-enabled-only=true"
    assert nats["lifecycle"]["preStop"]["exec"]["command"] == ["nats-server", "-sl=ldm=/var/run/nats/nats.pid"]
    # Memory request = limit, GOMEMLIMIT 80% of it, max_memory_store explicit (half of it).
    assert nats["resources"] == {"requests": {"cpu": "250m", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    env = {e["name"]: e for e in nats["env"]}
    assert env["GOMEMLIMIT"]["value"] == str(2 * 1024**3 * 80 // 100)
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "nats"
    # 30s lame duck + 10s grace must fit in the termination grace period.
    assert pod["terminationGracePeriodSeconds"] > 40
    (vct,) = spec["volumeClaimTemplates"]
    assert vct["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert "storageClassName" not in vct["spec"]
    assert {"name": "data", "mountPath": "/data"} in nats["volumeMounts"]
    exporter = next(c for c in pod["containers"] if c["name"] == "exporter")
    assert "-prefix=nats" in exporter["args"] and "-jsz=all" in exporter["args"]

    headless = one(objects, "Service", "nb-natsbridge-nats-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert {"name": "cluster", "port": 6222, "targetPort": "cluster"} in headless["spec"]["ports"]
    client = one(objects, "Service", "nb-natsbridge-nats")
    assert client["spec"]["type"] == "ClusterIP" and client["spec"]["ports"][0]["port"] == 4222
    assert one(objects, "PodDisruptionBudget", "nb-natsbridge-nats")["spec"]["maxUnavailable"] == 1

    conf = one(objects, "ConfigMap", "nb-natsbridge-nats-config")["data"]["nats.conf"]
    assert "sync_interval: always" in conf
    assert f"max_memory_store: {1024**3}\n" in conf
    assert 'http: "0.0.0.0:8222"' in conf
    for i in range(3):
        assert f"nats://nb-natsbridge-nats-{i}.nb-natsbridge-nats-headless.natsbridge.svc.cluster.local:6222" in conf
    assert sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_nats_non_default():
    objects, _ = render(NON_DEFAULT)
    sts = one(objects, "StatefulSet", "bridge-nats")
    assert sts["spec"]["replicas"] == 5
    assert sts["metadata"]["labels"]["team"] == "platform"
    pod = sts["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["nats"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NATS_PASSWORD_SOLO"]["valueFrom"]["secretKeyRef"] == {"name": "nats-auth", "key": "solo"}
    assert env["NATS_PASSWORD_NATSBRIDGE_PROVISION"]["valueFrom"]["secretKeyRef"] == {"name": "nats-auth", "key": "natsbridge-provision"}
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
    assert {"name": "tls", "secret": {"secretName": "nats-tls"}} in pod["volumes"]
    conf = one(objects, "ConfigMap", "bridge-nats-config")["data"]["nats.conf"]
    assert "sync_interval: 10s" in conf and f"max_memory_store: {1024**3}\n" in conf
    assert 'user: "solo"\n      password: $NATS_PASSWORD_SOLO\n' in conf and "verify: true" in conf
    # An empty allow-list would allow everything: the chart denies all instead.
    assert 'subscribe: { deny: [">"] }' in conf and 'publish: { allow: ["solo.>"] }' in conf
    assert conf.count("nats://bridge-nats-") == 5
    assert conf.count(".natsbridge.svc.corp.internal:6222") == 5
    assert not [o for o in objects if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "bridge-nats"]


def test_injector_self_signed_certificate_matches_the_ca_bundle(default_render):
    objects, _ = default_render
    secret = one(objects, "Secret", "nb-natsbridge-injector-tls")
    hook = one(objects, "MutatingWebhookConfiguration")
    (wh,) = hook["webhooks"]
    assert wh["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "nb-natsbridge-injector.natsbridge.svc" in sans
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=365)
    assert wh["clientConfig"]["service"] == {"name": "nb-natsbridge-injector", "namespace": "natsbridge", "path": "/mutate", "port": 8443}
    assert wh["failurePolicy"] == "Fail" and wh["sideEffects"] == "None"
    assert wh["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}]
    assert wh["namespaceSelector"]["matchLabels"] == {"natsbridge.io/inject": "enabled"}
    assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["natsbridge", "kube-system"]} in wh["namespaceSelector"]["matchExpressions"]

    dep = one(objects, "Deployment", "nb-natsbridge-injector")
    assert dep["spec"]["replicas"] == 2
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][0] == "inject"
    assert "--nats-url=nats://nb-natsbridge-nats.natsbridge.svc.cluster.local:4222" in c["args"]
    assert "--sidecar-image=ghcr.io/natsbridge/natsbridge:0.1.0" in c["args"]
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert one(objects, "Service", "nb-natsbridge-injector")["spec"]["ports"][0]["port"] == 8443
    assert one(objects, "ServiceAccount", "nb-natsbridge-injector")["automountServiceAccountToken"] is False


def test_injector_with_cert_manager_and_non_default_values():
    objects, _ = render(NON_DEFAULT)
    assert not [o for o in objects if o["kind"] == "Secret"]
    cert = one(objects, "Certificate", "bridge-injector")
    assert cert["spec"]["secretName"] == "bridge-injector-tls"
    assert "bridge-injector.natsbridge.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"] == {"name": "bridge-injector-selfsigned", "kind": "Issuer"}
    one(objects, "Issuer", "bridge-injector-selfsigned")
    hook = one(objects, "MutatingWebhookConfiguration")
    assert hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "natsbridge/bridge-injector"
    (wh,) = hook["webhooks"]
    assert "caBundle" not in wh["clientConfig"]
    assert wh["failurePolicy"] == "Ignore"
    assert wh["namespaceSelector"]["matchLabels"] == {"mesh": "nats"}
    assert {"key": "tier", "operator": "In", "values": ["apps"]} in wh["namespaceSelector"]["matchExpressions"]
    args = one(objects, "Deployment", "bridge-injector")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--nats-url=tls://bridge-nats.natsbridge.svc.corp.internal:4222" in args
    assert "--nats-url-secret={routes}-nats-auth/url" in args
    # TLS on: sidecars get the CA from the ConfigMap in their namespace.
    assert "--nats-ca-config-map=natsbridge-nats-ca/ca.crt" in args
    assert "--cpu-limit=1" in args and "--memory-limit=" in args and "--no-proxy=10.96.0.1" in args
    assert "--sidecar-log-level=debug" in args and "--sidecar-image-pull-policy=Always" in args


def test_injector_with_an_external_issuer_and_external_nats():
    objects, _ = render(CASES["external-nats"])
    assert not [o for o in objects if o["kind"] in ("StatefulSet", "Issuer")]
    assert one(objects, "Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--nats-url=nats://nats.shared:4222" in args
    assert not [a for a in args if a.startswith("--nats-ca-config-map")], "no TLS, no CA"


def test_injected_sidecars_get_the_nats_ca_with_tls():
    def injector_args(values):
        objects, _ = render(values)
        return one(objects, "Deployment", "nb-natsbridge-injector")["spec"]["template"]["spec"]["containers"][0]["args"]

    assert not [a for a in injector_args({}) if a.startswith("--nats-ca-config-map")], "plaintext NATS: no CA"
    tls = {"nats": {"tls": {"enabled": True, "secretName": "nats-tls", "caConfigMap": "corp-ca", "caKey": "root.pem"}}}
    assert "--nats-ca-config-map=corp-ca/root.pem" in injector_args(tls)
    external = {"nats": {"enabled": False, "externalUrl": "tls://nats.shared:4222"}}
    assert "--nats-ca-config-map=natsbridge-nats-ca/ca.crt" in injector_args(external)
    tls["nats"]["tls"]["caConfigMap"] = ""
    assert not [a for a in injector_args(tls) if a.startswith("--nats-ca-config-map")], "a CA the image trusts"


def test_external_nats_requires_a_url():
    with pytest.raises(helm_python.HelmError, match="externalUrl"):
        render({"nats": {"enabled": False}})


def test_schema_rejects_bad_values():
    for bad in [
        {"injector": {"failurePolicy": "Sometimes"}},
        {"nats": {"jetstream": {"syncInterval": "often"}}},
        {"routes": [{"name": "Bad_Name", "toml": "x"}]},
        {"routes": [{"name": "ok"}]},
        {"injector": {"sidecar": {"resources": {"cpuRequest": "lots"}}}},
        {"surprise": True},
        {"nats": {"auth": {"enabled": True, "secretName": "nats-auth"}}},
        {"nats": {"auth": {"users": {"bad.name": {"publish": [], "subscribe": []}}}}},
        {"nats": {"auth": {"users": {"natsbridge-provision": {"publish": [], "subscribe": []}}}}},
        {"nats": {"auth": {"users": {"orders": {"publish": ["orders.>"]}}}}},
        {"nats": {"auth": {"users": {"orders": {"publish": [], "subscribe": [], "password": "hunter2"}}}}},
        {"nats": {"resources": {"requests": {"memory": "512Mi"}, "limits": {"memory": "2Gi"}}}},
        {"nats": {"resources": {"limits": {"memory": "2 gigs"}}}},
        {"nats": {"jetstream": {"maxMemoryStore": "lots"}}},
        {"clusterDomain": "Cluster.Local."},
    ]:
        with pytest.raises(helm_python.HelmValuesError):
            render(bad)


def test_provisioning_jobs_and_routes_configmaps():
    objects, _ = render(example_values())
    jobs = find(objects, "Job")
    assert len(jobs) == 2
    for job, routes in zip(sorted(jobs, key=lambda j: j["metadata"]["name"]), ["agent-routes", "orchestration-routes"]):
        ann = job["metadata"]["annotations"]
        assert ann["helm.sh/hook"] == "post-install,post-upgrade"
        assert "before-hook-creation" in ann["helm.sh/hook-delete-policy"]
        pod = job["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["args"] == ["provision", "--config", "/etc/natsbridge/routes.toml"]
        assert pod["volumes"][0]["configMap"]["name"] == f"nb-natsbridge-provision-{routes}"
        # The provisioning user's password, from the users Secret, spliced in by the kubelet.
        assert c["env"] == [
            {"name": "NATS_PROVISION_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "nb-natsbridge-nats-users", "key": "natsbridge-provision"}}},
            {"name": "NATSBRIDGE_NATS_URL", "value": "nats://natsbridge-provision:$(NATS_PROVISION_PASSWORD)@nb-natsbridge-nats.natsbridge.svc.cluster.local:4222"},
        ]
        copy = one(objects, "ConfigMap", f"nb-natsbridge-provision-{routes}")
        assert copy["metadata"]["namespace"] == "natsbridge"
        app = one(objects, "ConfigMap", routes)
        assert app["metadata"]["namespace"] == "shop"
        assert copy["data"] == app["data"]
    non_default, _ = render(NON_DEFAULT)
    job = one(non_default, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "--force"
    assert one(non_default, "ConfigMap", "solo-routes")["metadata"]["namespace"] == "natsbridge"


def test_no_routes_means_no_jobs(default_render):
    objects, _ = default_render
    assert not [o for o in objects if o["kind"] == "Job"]


def test_monitors():
    objects, _ = render(NON_DEFAULT)
    pm = one(objects, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"natsbridge.io/injected": "true"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "nb-admin"
    # The exporter is off in NON_DEFAULT, so there is nothing for a ServiceMonitor to scrape.
    assert not [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert one(objects, "ConfigMap", "bridge-dashboard")["metadata"]["namespace"] == "grafana"
    objects, _ = render(example_values())
    sm = one(objects, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


def test_example_routes_configmaps_match_what_the_chart_ships():
    objects, _ = render(example_values())
    for name in ["orchestration-routes", "agent-routes"]:
        with open(EXAMPLES / f"{name}.yaml") as f:
            standalone = yaml.safe_load(f)
        rendered = one(objects, "ConfigMap", name)
        assert standalone["metadata"]["namespace"] == rendered["metadata"]["namespace"] == "shop"
        assert standalone["data"] == rendered["data"], name


def test_example_apps_opt_in_and_validate():
    with open(EXAMPLES / "apps.yaml") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    ns = next(d for d in docs if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["natsbridge.io/inject"] == "enabled"
    routes = {r["name"] for r in example_values()["routes"]}
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert ann["natsbridge.io/inject"] == "true"
        assert ann["natsbridge.io/routes"] in routes


def natsbridge(*args):
    return subprocess.run(
        ["cargo", "run", "-q", "--bin", "natsbridge", "--", *args],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )


def test_example_routes_pass_natsbridge_check():
    for r in example_values()["routes"]:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(r["toml"])
        try:
            out = natsbridge("check", f.name)
            assert out.returncode == 0, f'{r["name"]}:\n{out.stdout}\n{out.stderr[-3000:]}'
        finally:
            os.unlink(f.name)


def test_injector_args_are_flags_the_binary_accepts(default_render):
    """Every flag the chart passes to `natsbridge inject` exists in its --help."""
    out = natsbridge("inject", "--help")
    if out.returncode != 0 and "unrecognized subcommand" in out.stderr:
        pytest.skip("`natsbridge inject` is not wired into the binary yet")
    assert out.returncode == 0, out.stderr[-3000:]
    objects, _ = render(NON_DEFAULT)
    args = one(objects, "Deployment", "bridge-injector")["spec"]["template"]["spec"]["containers"][0]["args"]
    for a in args[1:]:
        flag = a.split("=", 1)[0]
        assert flag in out.stdout, f"{flag} not in `natsbridge inject --help`"


def test_nats_network_policy_admits_only_injected_pods(default_render):
    objects, _ = default_render
    np = one(objects, "NetworkPolicy")
    client, cluster, monitor = np["spec"]["ingress"]
    assert [p["port"] for p in client["ports"]] == [4222]
    peers = client["from"]
    assert peers[0] == {"namespaceSelector": {}, "podSelector": {"matchLabels": {"natsbridge.io/injected": "true"}}}
    assert peers[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "provision"
    assert len(peers) == 3, "nothing else reaches the client port"
    assert [p["port"] for p in cluster["ports"]] == [6222]
    assert "from" not in monitor and [p["port"] for p in monitor["ports"]] == [8222, 7777]

    objects, _ = render(NON_DEFAULT)
    client = one(objects, "NetworkPolicy")["spec"]["ingress"][0]
    assert client["from"][-1] == {"namespaceSelector": {"matchLabels": {"nats-clients": "true"}}}
    objects, _ = render({"nats": {"networkPolicy": {"enabled": False}}})
    assert not [o for o in objects if o["kind"] == "NetworkPolicy"]


def secret_text(secret, key):
    return base64.b64decode(secret["data"][key]).decode()


def test_nats_auth_is_on_by_default_with_one_user_per_service_and_generated_secrets():
    objects, notes = render(example_values())
    assert "one NATS user per service (agent, orchestration)" in notes and "WARNING" not in notes
    conf = one(objects, "ConfigMap", "nb-natsbridge-nats-config")["data"]["nats.conf"]
    assert "authorization {" in conf
    for user in ["agent", "orchestration", "natsbridge-provision"]:
        env = "NATS_PASSWORD_" + user.upper().replace("-", "_")
        assert f'user: "{user}"\n      password: ${env}\n' in conf, conf
    users = one(objects, "Secret", "nb-natsbridge-nats-users")
    assert users["metadata"]["namespace"] == "natsbridge"
    passwords = {k: secret_text(users, k) for k in users["data"]}
    assert sorted(passwords) == ["agent", "natsbridge-provision", "orchestration"]
    assert all(len(p) >= 32 for p in passwords.values()) and len(set(passwords.values())) == 3
    # No password in anything but Secrets.
    for o in objects:
        if o["kind"] != "Secret":
            text = yaml.safe_dump(o)
            assert not [p for p in passwords.values() if p in text], f'{o["kind"]}/{o["metadata"]["name"]}'
    # Each routes file's namespace gets its service's URL, with the same password the servers read.
    for routes, user in [("agent-routes", "agent"), ("orchestration-routes", "orchestration")]:
        s = one(objects, "Secret", f"{routes}-nats-auth")
        assert s["metadata"]["namespace"] == "shop"
        assert secret_text(s, "url") == f"nats://{user}:{passwords[user]}@nb-natsbridge-nats.natsbridge.svc.cluster.local:4222"
    sts = one(objects, "StatefulSet")
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NATS_PASSWORD_AGENT"]["valueFrom"]["secretKeyRef"] == {"name": "nb-natsbridge-nats-users", "key": "agent"}
    assert sts["spec"]["template"]["metadata"]["annotations"]["checksum/users"]
    args = one(objects, "Deployment", "nb-natsbridge-injector")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--nats-url-secret={routes}-nats-auth/url" in args


def test_passwords_are_generated_per_install_and_never_in_values():
    a, _ = render(example_values())
    b, _ = render(example_values())
    assert one(a, "Secret", "nb-natsbridge-nats-users")["data"] != one(b, "Secret", "nb-natsbridge-nats-users")["data"]
    with open(CHART / "values.yaml") as f:
        assert "password:" not in f.read().lower()


def test_generated_passwords_start_with_a_letter():
    # nats-server reads the unquoted `password: $NATS_PASSWORD_X` as a config value: a password
    # starting with a digit can read as a number or a size (`1e5…`, `4kb…`, `123`) and the
    # server exits at start. With randAlphaNum alone about one password in six started with a
    # digit; 2 renders x 63 users make a regression all but certain to show.
    values = example_values()
    values["nats"]["auth"]["users"].update({f"svc{i}": {"publish": [], "subscribe": []} for i in range(60)})
    for _ in range(2):
        objects, _ = render(values)
        users = one(objects, "Secret", "nb-natsbridge-nats-users")
        passwords = [secret_text(users, k) for k in users["data"]]
        assert len(passwords) == 63
        assert [p for p in passwords if not p[0].isalpha() or not p.isalnum() or len(p) != 40] == []


def test_a_routes_file_without_a_nats_user_fails_the_install():
    values = example_values()
    del values["nats"]["auth"]["users"]["agent"]
    with pytest.raises(helm_python.HelmError, match='service "agent", which has no NATS user'):
        render(values)


def test_nats_auth_off_is_explicit_and_leaves_no_credentials_behind():
    values = example_values()
    values["nats"]["auth"] = {"enabled": False}
    objects, notes = render(values)
    assert "WARNING: NATS authentication is OFF" in notes
    conf = one(objects, "ConfigMap", "nb-natsbridge-nats-config")["data"]["nats.conf"]
    assert "authorization" not in conf
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == ["nb-natsbridge-injector-tls"]
    args = one(objects, "Deployment", "nb-natsbridge-injector")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--nats-url-secret")]
    env = {e["name"] for e in one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env == {"SERVER_NAME", "GOMEMLIMIT"}


def test_existing_secret_mode_generates_no_credentials():
    values = example_values()
    values["nats"]["auth"]["existingSecret"] = "corp-nats-users"
    objects, _ = render(values)
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == ["nb-natsbridge-injector-tls"]
    sts = one(objects, "StatefulSet")
    assert "checksum/users" not in sts["spec"]["template"]["metadata"]["annotations"]
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NATS_PASSWORD_ORCHESTRATION"]["valueFrom"]["secretKeyRef"] == {"name": "corp-nats-users", "key": "orchestration"}


def test_example_nats_users_are_what_natsbridge_permissions_generates():
    """examples/nats-users.yaml is the generator's output for the example routes, unedited."""
    with tempfile.TemporaryDirectory() as d:
        names = []
        for r in example_values()["routes"]:
            with open(os.path.join(d, f'{r["name"]}.toml'), "w") as f:
                f.write(r["toml"])
            names.append(f'{r["name"]}.toml')
        out = subprocess.run(
            ["cargo", "run", "-q", "--manifest-path", str(REPO / "Cargo.toml"), "--bin", "natsbridge", "--",
             "permissions", "--format", "helm-values", *names],
            cwd=d, capture_output=True, text=True, timeout=900,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(EXAMPLES / "nats-users.yaml") as f:
        assert f.read() == out.stdout, "regenerate examples/nats-users.yaml (README: Walkthrough)"


def test_nats_memory_follows_the_limit():
    objects, _ = render({"nats": {"resources": {"limits": {"memory": "4Gi", "cpu": "2"}}}})
    sts = one(objects, "StatefulSet")
    nats = sts["spec"]["template"]["spec"]["containers"][0]
    assert nats["resources"] == {"requests": {"cpu": "250m", "memory": "4Gi"}, "limits": {"memory": "4Gi", "cpu": "2"}}
    assert {e["name"]: e.get("value") for e in nats["env"]}["GOMEMLIMIT"] == str(4 * 1024**3 * 8 // 10)
    conf = one(objects, "ConfigMap", "nb-natsbridge-nats-config")["data"]["nats.conf"]
    assert f"max_memory_store: {2 * 1024**3}\n" in conf
    conf = one(render({"nats": {"jetstream": {"maxMemoryStore": "256Mi"}}})[0], "ConfigMap", "nb-natsbridge-nats-config")["data"]["nats.conf"]
    assert f"max_memory_store: {256 * 1024**2}\n" in conf
    with pytest.raises(helm_python.HelmError, match="must stay below GOMEMLIMIT"):
        render({"nats": {"jetstream": {"maxMemoryStore": "2Gi"}}})


def test_cluster_domain_comes_from_a_value():
    # Routes files with their own hosts aside: everything the chart writes itself.
    values = dict(example_values(), clusterDomain="corp.internal")
    values["routes"] = [{"name": "solo-routes", "namespace": "shop", "toml": "[sidecar]\nservice = \"agent\"\n"}]
    objects, notes = render(values)
    text = yaml.safe_dump_all([{k: v for k, v in o.items() if k != "__template"} for o in objects]) + notes
    secrets = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-nats-auth")]
    assert secrets
    text += "".join(secret_text(s, "url") for s in secrets)
    assert "cluster.local" not in text
    assert "nb-natsbridge-nats.natsbridge.svc.corp.internal:4222" in text
    assert "nb-natsbridge-nats-0.nb-natsbridge-nats-headless.natsbridge.svc.corp.internal:6222" in text


@pytest.mark.parametrize("replicas", [2, 4, 0, 6])
def test_schema_refuses_even_nats_replicas(replicas):
    with pytest.raises(helm_python.HelmValuesError, match="replicas"):
        render({"nats": {"replicas": replicas}})


@pytest.mark.parametrize("replicas", [1, 3, 5, 7])
def test_schema_accepts_one_or_odd_nats_replicas(replicas):
    objects, _ = render({"nats": {"replicas": replicas}})
    assert one(objects, "StatefulSet")["spec"]["replicas"] == replicas
    conf = one(objects, "ConfigMap", "nb-natsbridge-nats-config")["data"]["nats.conf"]
    # One server runs without a cluster block (a cluster of one would wait for peers).
    assert ("cluster {" in conf) == (replicas > 1)
