"""agent: runs a workflow's agent.

Plain HTTP. It gets its work as POST /internal/execute (a JetStream consumer in its
sidecar), asks model for a key and a config (a Nest microservice; the sidecar speaks
Nest's wire format), asks vector for context, streams its answer token by token, asks
tool to run a tool, and says it is done. Every call goes to its sidecar (EGRESS_URL).
"""
import http.client, json, os, sys, threading, time, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EGRESS = os.environ.get("EGRESS_URL") or os.environ["NATSBRIDGE_URL"]  # `natsbridge dev` sets the latter
# A pause between tokens, as a model's pace: the demo sets it so that a sidecar can be
# restarted while a stream is open and the page visibly streams.
TOKEN_DELAY = float(os.environ.get("TOKEN_DELAY_MS", "0")) / 1000


# Retried calls: while the sidecar restarts (refused, reset) or NATS is away (503), for up
# to this long. Only calls with an idempotency key are retried: the key becomes Nats-Msg-Id,
# so a publish that did reach the stream before its answer was lost is stored once.
RETRY_FOR = 30


def call(path, body, key=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key  # becomes Nats-Msg-Id: a retried publish is stored once
    deadline = time.monotonic() + RETRY_FOR
    while True:
        req = urllib.request.Request(EGRESS + path, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return json.loads(r.read() or b"null")
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
            status = getattr(e, "code", None)
            if not key or (status is not None and status not in (502, 503, 504)) or time.monotonic() > deadline:
                raise
            print(f"agent: {path}: {status or e}; retrying with the same Idempotency-Key {key}", file=sys.stderr, flush=True)
            time.sleep(0.1)


def execute(job):
    wf, prompt = job["workflow_id"], job["prompt"]
    call(f"/agents/{wf}/started", {"workflow_id": wf, "model": "demo-1"}, f"{wf}-agent-started")
    key = call("/model/key", {"workflow_id": wf, "model": "demo-1"})
    config = call("/model/config", {"workflow_id": wf, "model": "demo-1"})
    hits = call("/vector/search", {"workflow_id": wf, "query": prompt, "k": 2})
    context = ", ".join(h["text"] for h in hits) or "nothing"
    answer = (f"Using {config['name']} (key {key['key_id']}) and what I know ({context}), "
              f"here is my answer to: {prompt}").split(" ")
    for i, word in enumerate(answer):
        token = word if i == 0 else " " + word
        time.sleep(TOKEN_DELAY)
        call(f"/tokens/{wf}", {"workflow_id": wf, "index": i, "token": token, "done": False}, f"{wf}-tok-{i}")
    call(f"/tokens/{wf}", {"workflow_id": wf, "index": len(answer), "token": "", "done": True}, f"{wf}-tok-end")
    tool = {"workflow_id": wf, "request_id": f"{wf}-tool", "tool": "wordcount", "input": job["tool_input"]}
    if job.get("redeliver_tool_once"):
        tool["redeliver_once"] = True  # the tool answers 503 after its effect: JetStream redelivers
    call("/tools/run", tool, f"{wf}-tool")
    call("/vector/upsert", {"id": wf, "text": prompt})
    call(f"/agents/{wf}/completed", {"workflow_id": wf, "answer": "".join(
        w if i == 0 else " " + w for i, w in enumerate(answer)), "tokens": len(answer)}, f"{wf}-agent-completed")


# Executions by workflow id, so that a redelivered request (its sidecar was killed before
# acking it) runs once: a second copy waits for the first and answers like it.
runs, runs_lock = {}, threading.Lock()


def execute_once(job):
    with runs_lock:
        run = runs.get(job["workflow_id"])
        first = run is None
        if first:
            run = runs[job["workflow_id"]] = {"done": threading.Event(), "ok": False}
    if first:
        try:
            execute(job)
            run["ok"] = True
        finally:
            if not run["ok"]:
                with runs_lock:
                    del runs[job["workflow_id"]]  # a failed run may be tried again
            run["done"].set()
    elif not run["done"].wait(25) or not run["ok"]:
        raise RuntimeError("an earlier delivery of this execution is still running or failed")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        job = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        try:
            execute_once(job)
            status = 200
        except Exception as e:  # a failed step: 503 asks JetStream to redeliver later
            print(f"agent: {job.get('workflow_id')}: {e}", file=sys.stderr)
            status = 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "0"))), Handler)  # PORT: from `natsbridge dev`
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()
