"""The chart's default NATS auth, booted on real nats-servers (one, and a 3-node cluster on
loopback): the walkthrough's values plus the users `natsbridge permissions --format
helm-values` generated from its routes (examples/nats-users.yaml), rendered by the real Helm
engine. The servers get the environment the kubelet would give them (passwords from the
rendered Secret), the services connect with the URLs of their rendered `<routes>-nats-auth`
Secrets, and the real `natsbridge provision` runs as the provisioning Job does.

Each service can do what its routes need, nothing else: the server refuses other services'
subjects, a tunnel subject and JetStream API calls its routes do not use, and anonymous or
wrong-password connections."""

import asyncio
import base64
import os
import subprocess
import tempfile
import time
import urllib.parse

import nats
import pytest

from conftest import REPO, example_values, one, render
from natscluster import Cluster, http_json, server_env


def rendered(replicas):
    values = example_values()
    values["nats"]["replicas"] = replicas
    if replicas == 1:
        # One server cannot hold the example's R3 stream; everything else is as shipped.
        for r in values["routes"]:
            r["toml"] = r["toml"].replace("replicas = 3", "replicas = 1")
    objects, _ = render(values)
    return objects, values


def secret_value(objects, name, key):
    return base64.b64decode(one(objects, "Secret", name)["data"][key]).decode()


def credentials(objects, routes):
    """User and password of the URL the injector hands to this routes file's sidecars."""
    url = urllib.parse.urlsplit(secret_value(objects, f"{routes}-nats-auth", "url"))
    return url.username, url.password


@pytest.fixture(params=[1, 3], ids=["single-server", "3-node-cluster"])
def booted(request):
    objects, values = rendered(request.param)
    conf = one(objects, "ConfigMap", "nb-natsbridge-nats-config")["data"]["nats.conf"]
    pods = [f"nb-natsbridge-nats-{i}" for i in range(request.param)]
    c = Cluster(conf, pods, env=server_env(objects)).start()
    try:
        c.wait_healthy()
        yield objects, values, c
    finally:
        c.stop()


def provision(objects, values, cluster):
    """Runs `natsbridge provision` for each routes file with the Job's NATSBRIDGE_NATS_URL,
    its $(NATS_PROVISION_PASSWORD) filled in from the rendered Secret and the Service host
    replaced by the loopback servers. Retried like the Job (backoffLimit) while the meta
    leader is elected."""
    job_env = {}
    for job in (o for o in objects if o["kind"] == "Job"):
        for e in job["spec"]["template"]["spec"]["containers"][0]["env"]:
            job_env[e["name"]] = e
    ref = job_env["NATS_PROVISION_PASSWORD"]["valueFrom"]["secretKeyRef"]
    password = secret_value(objects, ref["name"], ref["key"])
    template = job_env["NATSBRIDGE_NATS_URL"]["value"].replace("$(NATS_PROVISION_PASSWORD)", password)
    service_host = "nb-natsbridge-nats.natsbridge.svc.cluster.local:4222"
    assert service_host in template, template
    url = ",".join(template.replace(service_host, u.removeprefix("nats://")) for u in cluster.client_urls())
    with tempfile.TemporaryDirectory() as d:
        for r in values["routes"]:
            path = os.path.join(d, f'{r["name"]}.toml')
            with open(path, "w") as f:
                f.write(r["toml"])
            deadline = time.monotonic() + 120
            while True:
                out = subprocess.run(
                    ["cargo", "run", "-q", "--bin", "natsbridge", "--", "provision", "--config", path],
                    cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ, NATSBRIDGE_NATS_URL=url),
                )
                if out.returncode == 0:
                    break
                assert time.monotonic() < deadline, f'provision {r["name"]}:\n{out.stdout}\n{out.stderr[-3000:]}'
                time.sleep(1)  # the Job's retry interval while JetStream elects its meta leader


class Client:
    """A connection as one service, collecting the server's permission refusals."""

    def __init__(self):
        self.refused = []
        self.nc = None

    async def connect(self, url, user, password):
        async def on_error(e):
            self.refused.append(str(e))

        self.nc = await nats.connect(
            servers=[url], user=user, password=password, error_cb=on_error, connect_timeout=5, allow_reconnect=False
        )
        return self

    async def wait_refused(self, op, subject, timeout=5):
        # nats-py lowercases the server's -ERR text.
        want = f'permissions violation for {op} to "{subject}"'.lower()
        deadline = time.monotonic() + timeout
        while not any(want in r.lower() for r in self.refused):
            assert time.monotonic() < deadline, f"server did not refuse {op} {subject}: {self.refused}"
            await self.nc.flush()  # a round trip: the -ERR, if any, arrives before the PONG


async def wait_interest(monitor, subject, queue, timeout=10):
    """Waits until the server's monitoring endpoint lists a subscription on `subject` in
    `queue`: the responder's flush returns before its interest is visible to other clients
    (a request right after it got "no responders" about 1 run in 5), /subsz shows when it is."""
    deadline = time.monotonic() + timeout
    url = f"{monitor}/subsz?subs=1&test={urllib.parse.quote(subject)}"
    while True:
        _, body = http_json(url)
        subs = (body or {}).get("subscriptions_list") or []
        if any(s.get("subject") == subject and s.get("qgroup") == queue for s in subs):
            return
        assert time.monotonic() < deadline, f"{subject} (queue {queue}) never listed by {url}: {body}"
        await asyncio.sleep(0.05)  # poll interval of the monitoring endpoint


async def once_served(what, info, op, no_responders, timeout=10):
    """`op` against a stream or consumer provisioned a moment ago. On the 3-node cluster its
    leader is elected, and its interest reaches the other servers' routes, after `provision`
    returns: a request before that gets "no responders" (seen by ci-fresh and by
    scripts/test-k8s run three at a time). This waits until `info()` names a leader, then
    repeats `op` only while it raises `no_responders`; any other answer, or none within
    `timeout`, still fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        state = await info()
        if state.cluster is None or state.cluster.leader:
            break
        assert time.monotonic() < deadline, f"{what} has no leader after {timeout}s: {state}"
        await asyncio.sleep(0.05)  # poll interval of the leader election
    while True:
        try:
            return await op(max(deadline - time.monotonic(), 1))
        except no_responders:
            # the leader's interest has not reached this server yet
            assert time.monotonic() < deadline, f"{what} never answered in {timeout}s"
            await asyncio.sleep(0.05)


async def fetch_once_served(js, pull):
    """One message from the consumer provisioned a moment ago (`once_served`)."""
    return await once_served("agent-tasks", lambda: js.consumer_info("AGENT_TASKS", "agent-tasks"),
                             lambda left: pull.fetch(1, timeout=left),
                             nats.js.errors.ServiceUnavailableError)


async def publish_once_stored(js, watcher, subject, payload, msg_id):
    """A JetStream publish to the stream provisioned a moment ago (`once_served`). The message
    id makes a repeat a duplicate, never a second message. `watcher` reads the stream's info
    (the publisher may not)."""
    return await once_served("AGENT_TASKS", lambda: watcher.stream_info("AGENT_TASKS"),
                             lambda _left: js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id}),
                             nats.js.errors.NoStreamResponseError)


async def exercise(objects, url, monitor):
    """`url` is a client URL of the server whose monitoring endpoint is `monitor`."""
    orch_user, orch_pw = credentials(objects, "orchestration-routes")
    agent_user, agent_pw = credentials(objects, "agent-routes")
    assert (orch_user, agent_user) == ("orchestration", "agent")
    orch = await Client().connect(url, orch_user, orch_pw)
    agent = await Client().connect(url, agent_user, agent_pw)
    try:
        # Own subjects. agent answers plans in its queue group; orchestration asks.
        plans = []

        async def answer(msg):
            plans.append(msg.data)
            await msg.respond(b"plan-ok")

        await agent.nc.subscribe("agent.plans.create", queue="agent", cb=answer)
        await agent.nc.flush()
        await wait_interest(monitor, "agent.plans.create", "agent")
        # Asked once: "no responders" now fails the test.
        reply = await orch.nc.request("agent.plans.create", b"plan-1", timeout=5)
        assert reply.data == b"plan-ok"
        # orchestration's JetStream publish is stored; agent pulls and acks it.
        ajs = agent.nc.jetstream(timeout=10)
        ack = await publish_once_stored(orch.nc.jetstream(timeout=10), ajs, "agent.tasks.submit", b"task-1", "t-1")
        assert ack.stream == "AGENT_TASKS" and ack.seq == 1 and not ack.duplicate
        pull = await ajs.pull_subscribe_bind("agent-tasks", stream="AGENT_TASKS")
        (msg,) = await fetch_once_served(ajs, pull)
        assert msg.data == b"task-1"
        await msg.ack_sync(timeout=10)
        info = await ajs.consumer_info("AGENT_TASKS", "agent-tasks")
        assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == ack.seq
        assert orch.refused == [] and agent.refused == [], "own subjects are never refused"

        # Others' subjects. A refused publish is never delivered: agent watches the inbox
        # subject orchestration may not publish to, and orchestration's next (allowed) message
        # on the same connection proves the refused one would have arrived first.
        stolen = []

        async def steal(msg):
            stolen.append(msg.data)

        await agent.nc.subscribe("_INBOX.probe.>", cb=steal)
        await agent.nc.flush()
        await orch.nc.publish("_INBOX.probe.reply", b"forged reply")
        await orch.nc.publish("natsbridge.tunnel.agent", b"GET /admin HTTP/1.1\r\n\r\n")
        await orch.nc.subscribe("agent.plans.create")
        await orch.nc.request("agent.plans.create", b"marker", timeout=5)
        assert plans[-1] == b"marker" and stolen == []
        await orch.wait_refused("Publish", "_INBOX.probe.reply")
        await orch.wait_refused("Publish", "natsbridge.tunnel.agent")
        await orch.wait_refused("Subscription", "agent.plans.create")
        await agent.nc.publish("agent.tasks.submit", b"not agent's to publish")
        await agent.wait_refused("Publish", "agent.tasks.submit")

        # JetStream API calls the routes do not need: no answer, and nothing changes.
        for client, subject in [
            (orch, "$JS.API.STREAM.DELETE.AGENT_TASKS"),
            (orch, "$JS.API.STREAM.INFO.AGENT_TASKS"),
            (agent, "$JS.API.CONSUMER.DELETE.AGENT_TASKS.agent-tasks"),
            (agent, "$JS.API.STREAM.PURGE.AGENT_TASKS"),
            (agent, "$JS.API.STREAM.CREATE.STOLEN"),
        ]:
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await client.nc.request(subject, b"{}", timeout=1)
            await client.wait_refused("Publish", subject)
        info = await ajs.stream_info("AGENT_TASKS")
        assert info.state.messages == 1, "the stream is neither deleted nor purged"
        assert (await ajs.consumer_info("AGENT_TASKS", "agent-tasks")).name == "agent-tasks"
    finally:
        await orch.nc.close()
        await agent.nc.close()


async def refused_connection(url, **auth):
    with pytest.raises(Exception) as e:
        nc = await nats.connect(servers=[url], connect_timeout=3, allow_reconnect=False, max_reconnect_attempts=0, **auth)
        await nc.close()
    assert "authorization" in repr(e.value).lower() or isinstance(e.value, nats.errors.AuthorizationError), repr(e.value)


def test_each_service_gets_its_own_subjects_and_nothing_else(booted):
    objects, values, cluster = booted
    provision(objects, values, cluster)
    asyncio.run(exercise(objects, cluster.client_urls()[0], cluster.monitor(0)))


def test_anonymous_and_wrong_passwords_are_refused(booted):
    objects, _, cluster = booted
    url = cluster.client_urls()[-1]
    asyncio.run(refused_connection(url))
    _, agent_pw = credentials(objects, "agent-routes")
    _, orch_pw = credentials(objects, "orchestration-routes")
    asyncio.run(refused_connection(url, user="agent", password=orch_pw))
    asyncio.run(refused_connection(url, user="agent", password=agent_pw + "x"))
    # ...while the right one connects, so the refusals above are about the credentials.
    async def right():
        nc = await nats.connect(servers=[url], user="agent", password=agent_pw, connect_timeout=3, allow_reconnect=False)
        await nc.close()

    asyncio.run(right())
