"""The demo's flow printer: a plain NATS subscriber on `>` that prints one line per hop.

It knows who sends and who receives each subject from the routes files (model's Nest
patterns are answered by model itself), prints `+ms subject mode from → to` for every message of the platform (ms since
the workflow's first message), and appends each message to a JSON-lines file for the
tests. It sees what crosses the server; it takes no part in the flow.

    python tap.py NATS_URL HOPS_JSONL routes/*.toml
"""
import asyncio, json, sys, time, tomllib



def matches(pattern, subject):
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def load(files):
    """[(subject pattern, mode, from, to)] from the routes files."""
    out, consumers = [], []
    for path in files:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        svc = doc["sidecar"]["service"]
        for r in doc.get("outbound", []):
            if r["mode"] == "tunnel":
                out.append([f"natsbridge.tunnel.{r['service']}", "tunnel", svc, r["service"]])
            else:
                subject = r.get("subject") or r.get("pattern")
                subject = ".".join("*" if t.startswith("{") else t for t in subject.split("."))
                codec = "/nestjs" if r.get("codec") == "nestjs" else ""
                out.append([subject, r["mode"] + codec, svc, None])
        for r in doc.get("inbound", []):
            if r.get("subject"):
                consumers.append((r["subject"], svc))
            dead = r.get("dead_letter") or f"dlq.{svc}.{r['name']}"
            if r.get("mode") == "jetstream":
                out.append([dead, "dead letter", svc, "DLQ"])
    for hop in out:
        if hop[3] is None:
            to = [c for pat, c in consumers if matches(pat, hop[0].replace("*", "x"))]
            to += ["model"] if hop[0].startswith("model.") and hop[2] != "model" else []  # its Nest patterns
            hop[3] = ", ".join(dict.fromkeys(to)) or "(notification)"
    for pat, svc in consumers:  # subjects consumed but produced by no route: the dead letters, read by orchestration
        for hop in out:
            if hop[2] != "DLQ" and hop[1] == "dead letter" and matches(pat, hop[0]):
                hop[3] += f", {svc}"
    return out


def workflow_of(data):
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("data"), dict):  # a Nest packet
        body = body["data"]
    return (body.get("workflow_id") or body.get("id")) if isinstance(body, dict) else None


async def main():
    import nats
    url, jsonl, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    hops = load(files)
    starts, tokens = {}, {}
    out = open(jsonl, "a", buffering=1)
    nc = await nats.connect(url)

    async def seen(msg):
        s = msg.subject
        if s.startswith(("_INBOX", "$")) or (msg.reply or "").startswith("$JS.ACK."):
            return  # replies, and JetStream deliveries to consumers (the publish was shown)
        hop = next((h for h in hops if matches(h[0], s)), None)
        headers = msg.headers or {}
        if hop is None:
            hop = [s, "?", "?", "?"]
        frm = "natsbridge dlq replay" if "Bridge-Replay-Of" in headers else hop[2]
        wf = workflow_of(msg.data)
        now = time.monotonic()
        ms = (now - starts.setdefault(wf, now)) * 1000 if wf else 0.0
        out.write(json.dumps({"subject": s, "mode": hop[1], "from": frm, "to": hop[3], "workflow": wf,
                              "ms": round(ms, 1), "headers": dict(headers), "data": msg.data.decode(errors="replace")}) + "\n")
        if s.startswith("agent.token.streamed."):  # one line for the first token and one for the last
            n = tokens[s] = tokens.get(s, 0) + 1
            if n > 1 and b'"done": true' not in msg.data:
                return
            s = f"{s} ({'first token' if n == 1 else f'{n} messages, done'})"
        when = f"{ms:7.1f} ms" if wf else "       · " + "  "
        print(f"  {when}  {s:<52} {hop[1]:<16} {frm} → {hop[3]}", flush=True)

    await nc.subscribe(">", cb=seen)
    await nc.flush()
    print("tap ready", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
