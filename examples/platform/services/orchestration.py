"""orchestration: starts a workflow, asks the agent to run it, and finishes or fails it.

Plain HTTP. Every call it makes goes to its sidecar (EGRESS_URL); every call it gets comes
from its sidecar: POST /workflows (gateway, tunnelled), and the agent's and tool's
completion events and the tool's dead letters (JetStream consumers).
"""
import json, os, sys, threading, urllib.request, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EGRESS = os.environ.get("EGRESS_URL") or os.environ["NATSBRIDGE_URL"]  # `natsbridge dev` sets the latter
state, lock = {}, threading.Lock()  # workflow id → what has finished


def send(path, body, key):
    req = urllib.request.Request(EGRESS + path, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Idempotency-Key": key})
    with urllib.request.urlopen(req, timeout=15) as r:
        return r.status


def settle(wf):
    """Completes a workflow once both the agent and its tool have finished."""
    with lock:
        s = state.setdefault(wf, {})
        if s.get("done") or "answer" not in s or "tool_result" not in s:
            return
        s["done"] = "completed"
    send(f"/workflows/{wf}/completed", {"workflow_id": wf, "answer": s["answer"], "tool_result": s["tool_result"]},
         f"{wf}-completed")


def fail(wf, reason):
    with lock:
        s = state.setdefault(wf, {})
        if s.get("done"):
            return
        s["done"] = "failed"
    send(f"/workflows/{wf}/failed", {"workflow_id": wf, "reason": reason}, f"{wf}-failed")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/workflows":
            wf = "wf-" + uuid.uuid4().hex[:10]
            send(f"/workflows/{wf}/started", {"workflow_id": wf, "prompt": body["prompt"]}, f"{wf}-started")
            ask = {"workflow_id": wf, "prompt": body["prompt"], "tool_input": body.get("tool_input", ""),
                   "redeliver_tool_once": bool(body.get("redeliver_tool_once"))}
            send("/agents/execute", ask, f"{wf}-agent")
            return self.reply(201, {"workflow_id": wf})
        wf = body.get("workflow_id", "")
        if self.path == "/internal/agent-completed":
            with lock:
                state.setdefault(wf, {})["answer"] = body["answer"]
            settle(wf)
        elif self.path == "/internal/tool-completed":
            with lock:
                state.setdefault(wf, {})["tool_result"] = body["result"]
            settle(wf)
        elif self.path == "/internal/tool-dead-lettered":
            fail(wf, "tool request dead-lettered: " + self.headers.get("Bridge-Dlq-Reason", "unknown"))
        else:
            return self.reply(404, {"error": "no such route"})
        self.reply(200, {"ok": True})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "0"))), Handler)  # PORT: from `natsbridge dev`
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()
