#!/usr/bin/env python3
"""Acked JetStream writes across a stream-leader SIGKILL, without natsbridge.

The same pattern as tests/faults/cluster_leader.rs `cluster_node_killed_under_load_loses_no_acked_message`,
with a raw nats-py publisher instead of the sidecar:

- three nats-server nodes on loopback, each `jetstream { sync_interval: always }`;
- an R3 file stream EVENTS on `events.>`;
- W publishers, each publishing a unique id (body and Nats-Msg-Id) with a 3 s deadline,
  retrying "no responders" twice 250 ms apart (as the sidecar and the Go client do), with
  a pause between messages;
- B busy-loop processes competing for the CPU;
- once 200 publishes are acked, the stream leader is SIGKILLed; publishing goes on until
  200 more are acked.

Then every acked message is read back by its acked sequence (STREAM.MSG.GET on the leader):
at once, again when every surviving replica is current, and again after the killed node has
rejoined and all three are current. A message counts as LOST only on the server's word
("no message found", or another message at its sequence) at the last read; a read that
errors is UNVERIFIED, and its error is printed. Exit status 1 if any run lost or could not
verify an acked message.

    python tests/repro/cluster_leader_kill.py --server /path/to/nats-server --runs 5 --busy 2
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError, NotFoundError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, binary, i, port, route_port, routes, root):
        self.binary, self.i, self.port = binary, i, port
        self.dir = os.path.join(root, f"n{i}")
        os.makedirs(self.dir)
        self.log = os.path.join(self.dir, "nats.log")
        self.conf = os.path.join(self.dir, "nats.conf")
        with open(self.conf, "w") as f:
            f.write(
                f'listen: "127.0.0.1:{port}"\n'
                f'jetstream {{ store_dir: "{self.dir}/js"\nsync_interval: always\n}}\n'
                "max_payload: 1MB\n"
                f"server_name: n{i}\n"
                f'cluster {{ name: c1\n listen: "127.0.0.1:{route_port}"\n routes: [{", ".join(routes)}] }}\n'
            )
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([self.binary, "-c", self.conf], stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"n{self.i} did not listen")

    def kill(self):
        if self.proc:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


async def stream_info(nc):
    try:
        m = await nc.request("$JS.API.STREAM.INFO.EVENTS", b'{"deleted_details":true}', timeout=5)
        return json.loads(m.data)
    except Exception as e:  # noqa: BLE001 - evidence, whatever it is
        return {"request_error": repr(e)}


def describe(info):
    if "state" not in info:
        return f"no stream info: {info}"
    s, c = info["state"], info.get("cluster", {})
    reps = "; ".join(
        f"{r.get('name')} current={r.get('current')} lag={r.get('lag')} offline={r.get('offline', False)}" for r in c.get("replicas", [])
    )
    return (
        f"leader {c.get('leader')}; messages={s.get('messages')} num_deleted={s.get('num_deleted')} "
        f"first_seq={s.get('first_seq')} last_seq={s.get('last_seq')} deleted={s.get('deleted')}; replicas [{reps}]"
    )


def all_current(info, down):
    """A leader, and every replica but the node `down` (None: all) current, not lagging."""
    c = info.get("cluster", {})
    reps = [r for r in c.get("replicas", []) if r.get("name") != down]
    return bool(c.get("leader")) and len(reps) >= (1 if down else 2) and all(r.get("current") and not r.get("lag") for r in reps)


async def wait_current(nc, down, timeout):
    deadline = time.time() + timeout
    while True:
        info = await stream_info(nc)
        if all_current(info, down) or time.time() > deadline:
            return all_current(info, down), info
        await asyncio.sleep(0.1)


async def read(js, seq):
    try:
        m = await js.get_msg("EVENTS", seq)
        return ("found", m.data.decode())
    except NotFoundError:
        return ("missing", None)
    except Exception as e:  # noqa: BLE001
        return ("failed", repr(e))


async def one_run(args, run):
    """One run; the servers and busy loops it starts end with it, whatever happens."""
    root = tempfile.mkdtemp(prefix="repro-leader-kill-")
    ports = [free_port() for _ in range(3)]
    rports = [free_port() for _ in range(3)]
    routes = [f'"nats-route://127.0.0.1:{p}"' for p in rports]
    nodes = [Node(args.server, i, ports[i], rports[i], routes, root) for i in range(3)]
    busy = []
    try:
        for n in nodes:
            n.start()
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        return await measure(args, run, root, ports, nodes)
    finally:
        for b in busy:
            b.kill()
            b.wait()
        for n in nodes:
            n.kill()
        shutil.rmtree(root, ignore_errors=True)


async def measure(args, run, root, ports, nodes):
    client_errors = []

    async def on_error(e):  # the killed node's connection breaks: expected, counted
        client_errors.append(repr(e))

    nc = await nats.connect(
        servers=[f"nats://127.0.0.1:{p}" for p in ports], max_reconnect_attempts=-1, reconnect_time_wait=0.1, error_cb=on_error
    )
    js = nc.jetstream(timeout=5)
    deadline = time.time() + 60  # a new cluster on a loaded machine can take a while
    while True:
        try:
            await js.add_stream(name="EVENTS", subjects=["events.>"], storage="file", num_replicas=3)
            break
        except Exception:
            if time.time() > deadline:
                raise
            await asyncio.sleep(0.1)

    if args.meta_leader:
        # Make the stream leader the meta leader too (the node that elected itself at start).
        meta = next(i for i, n in enumerate(nodes) if "Self is new JetStream cluster metadata leader" in open(n.log).read())
        for _ in range(20):
            if (await stream_info(nc)).get("cluster", {}).get("leader") == f"n{meta}":
                break
            try:
                await nc.request(
                    "$JS.API.STREAM.LEADER.STEPDOWN.EVENTS", json.dumps({"placement": {"preferred": f"n{meta}"}}).encode(), timeout=5
                )
            except Exception:  # noqa: BLE001 - retried
                pass
            await asyncio.sleep(0.5)

    log = []  # (id, status, seq, started)
    counter = iter(range(10**9))
    stop = asyncio.Event()

    async def worker():
        while not stop.is_set():
            mid = f"m-{next(counter):06d}"
            started = time.time()
            end = started + 3.0
            status, seq = "error", None
            for attempt in range(3):
                try:
                    ack = await asyncio.wait_for(
                        js.publish("events.created", mid.encode(), headers={"Nats-Msg-Id": mid}, timeout=3), max(0.01, end - time.time())
                    )
                    status, seq = "acked", ack.seq
                    break
                except (NoRespondersError, NoStreamResponseError):
                    if attempt < 2 and time.time() + 0.25 < end:
                        await asyncio.sleep(0.25)
                        continue
                    status = "no-responders"
                    break
                except (asyncio.TimeoutError, NatsTimeout):
                    status = "timeout"
                    break
                except Exception as e:  # noqa: BLE001
                    status = f"error {type(e).__name__}"
                    break
            log.append((mid, status, seq, started))
            await asyncio.sleep(args.pace)

    tasks = [asyncio.create_task(worker()) for _ in range(args.workers)]
    acked = lambda: sum(1 for r in log if r[1] == "acked")  # noqa: E731
    while acked() < 200:
        await asyncio.sleep(0.02)
    info = await stream_info(nc)
    leader = info.get("cluster", {}).get("leader")
    idx = int(leader[1:])
    was_meta = "Self is new JetStream cluster metadata leader" in open(nodes[idx].log).read()
    killed_at, acked_at_kill = time.time(), acked()
    nodes[idx].kill()

    # How long STREAM.MSG.GET is unavailable after the kill (the old test read-back's blind
    # spot): read seq 1 every 100 ms until it answers, noting the errors meanwhile.
    read_gap = {"errors": {}, "ok_after": None}

    async def probe_reads():
        while time.time() < killed_at + 60:
            kind, what = await read(js, 1)
            if kind == "found":
                read_gap["ok_after"] = time.time() - killed_at
                return
            read_gap["errors"][what if kind == "failed" else kind] = read_gap["errors"].get(what if kind == "failed" else kind, 0) + 1
            await asyncio.sleep(0.1)

    prober = asyncio.create_task(probe_reads())
    deadline = time.time() + 30
    while sum(1 for r in log if r[1] == "acked" and r[3] > killed_at) < 200 and time.time() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    await prober

    ok = [r for r in log if r[1] == "acked"]
    after = [r for r in log if r[3] >= killed_at]
    first_ack = min((r[3] for r in after if r[1] == "acked"), default=None)
    recovery = f"{first_ack - killed_at:.2f}s" if first_ack else "never"
    history = []
    info1 = await stream_info(nc)
    history.append("after the kill: " + describe(info1))
    reads = {r[2]: await read(js, r[2]) for r in ok}
    bad = lambda rs: [r for r in ok if rs.get(r[2]) != ("found", r[0])]  # noqa: E731
    first_bad = bad(reads)
    if first_bad:
        history.append(f"first read-back: {len(first_bad)} unread: " + ", ".join(f"{r[0]}@{r[2]}={reads[r[2]]}" for r in first_bad[:20]))
    cur, info2 = await wait_current(nc, leader, 20)
    history.append(f"survivors current={cur}: " + describe(info2))
    for r in bad(reads):
        reads[r[2]] = await read(js, r[2])
    nodes[idx].start()
    cur3, info3 = await wait_current(nc, None, 30)
    history.append(f"n{idx} back, all current={cur3}: " + describe(info3))
    finals = {r[2]: await read(js, r[2]) for r in ok}
    lost = [r for r in ok if finals[r[2]][0] == "missing" or (finals[r[2]][0] == "found" and finals[r[2]][1] != r[0])]
    unverified = [r for r in ok if finals[r[2]][0] == "failed"]
    statuses = {}
    for r in log:
        statuses[r[1]] = statuses.get(r[1], 0) + 1
    seqs = [r[2] for r in ok]
    dup_seqs = len(seqs) - len(set(seqs))
    print(
        f"run {run}: server {args.server_version} sent={len(log)} acked={len(ok)} lost={len(lost)} unverified={len(unverified)} "
        f"unread_at_first={len(first_bad)} acked_seqs_shared={dup_seqs} killed={leader} (meta leader at start: {was_meta}) after {acked_at_kill} acks; statuses {statuses}; "
        f"client connection errors {len(client_errors)}; first acked publish started {recovery} after the kill"
    )
    gap = f"{read_gap['ok_after']:.2f}s" if read_gap["ok_after"] is not None else "over 60s"
    print(f"  STREAM.MSG.GET answered again {gap} after the kill; failures meanwhile: {read_gap['errors']}")
    for h in history:
        print("  " + h)
    for r in lost[:20]:
        print(f"  LOST {r[0]} acked seq {r[2]}: {finals[r[2]]}")
    for r in unverified[:20]:
        print(f"  UNVERIFIED {r[0]} acked seq {r[2]}: {finals[r[2]]}")

    await nc.close()
    if lost or unverified or first_bad:
        keep = os.path.join(args.keep, f"run-{run}-{int(time.time())}")
        shutil.copytree(root, keep, ignore=shutil.ignore_patterns("js"))
        with open(os.path.join(keep, "history.txt"), "w") as f:
            f.write("\n".join(history) + "\n")
        print(f"  evidence kept in {keep}")
        for n in nodes:
            for line in open(n.log).read().splitlines():
                if "metadata leader" in line or "new stream leader" in line:
                    print(f"  n{n.i}: {line}")
    return len(lost), len(unverified), len(first_bad)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=os.environ.get("NATS_SERVER_BIN", "nats-server"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--pace", type=float, default=0.02)
    p.add_argument("--busy", type=int, default=2, help="busy-loop processes competing for the CPU")
    p.add_argument("--meta-leader", action="store_true", help="kill a stream leader that is also the meta leader")
    p.add_argument("--keep", default=os.path.join(tempfile.gettempdir(), "repro-leader-kill-evidence"))
    args = p.parse_args()
    args.server_version = subprocess.run([args.server, "--version"], capture_output=True, text=True).stdout.strip()
    totals = [0, 0, 0]
    for run in range(1, args.runs + 1):
        for i, v in enumerate(asyncio.run(one_run(args, run))):
            totals[i] += v
    print(f"{args.server_version}: {args.runs} runs, lost {totals[0]}, unverified {totals[1]}, unread at the first read {totals[2]}")
    sys.exit(1 if totals[0] or totals[1] else 0)


if __name__ == "__main__":
    main()
