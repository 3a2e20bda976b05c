"""gateway: the platform's public REST API and its browser page.

Plain HTTP. POST /workflows keeps its external API: it publishes an authentication event
and starts the workflow at orchestration (an HTTP call, tunnelled over NATS by its
sidecar). GET /workflows/<id>/log reads the execution log (tunnelled to execution), and
GET /workflows/<id>/tokens passes the workflow's token stream through (SSE, resumable
with Last-Event-ID). GET / is the page. Every outgoing call goes to EGRESS_URL.
"""
import json, os, sys, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EGRESS = os.environ["EGRESS_URL"]
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gateway.html")


def call(method, path, body=None, host=None, headers=None):
    h = {"Content-Type": "application/json", **(headers or {})}
    if host:
        h["Host"] = host  # the sidecar's tunnel routes match on it
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(EGRESS + path, data, h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, data, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        if self.path != "/workflows":
            return self.answer(404, b'{"error":"no such route"}')
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        user = "bearer" if self.headers.get("Authorization") else "anonymous"
        call("POST", "/events/auth", {"user": self.headers.get("X-User", "demo"), "method": user})
        status, data = call("POST", "/workflows", body, host="orchestration")
        if status != 201:
            return self.answer(502, data)
        wf = json.loads(data)["workflow_id"]
        out = {"workflow_id": wf, "log": f"/workflows/{wf}/log", "tokens": f"/workflows/{wf}/tokens"}
        self.answer(202, json.dumps(out).encode())

    def do_GET(self):
        parts = self.path.split("?")[0].split("/")
        if self.path == "/":
            with open(PAGE, "rb") as f:
                return self.answer(200, f.read(), "text/html; charset=utf-8")
        if len(parts) == 4 and parts[1] == "workflows" and parts[3] == "log":
            status, data = call("GET", f"/executions/{parts[2]}", host="execution")
            return self.answer(status, data)
        if len(parts) == 4 and parts[1] == "workflows" and parts[3] == "tokens":
            return self.tokens(parts[2])
        self.answer(404, b'{"error":"no such route"}')

    def tokens(self, wf):
        """Passes the sidecar's SSE stream through as it arrives, Last-Event-ID included."""
        resume = {"Last-Event-ID": self.headers["Last-Event-ID"]} if self.headers.get("Last-Event-ID") else {}
        req = urllib.request.Request(f"{EGRESS}/executions/{wf}/tokens", headers=resume)
        try:
            upstream = urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code != 503:
                return self.answer(e.code, e.read())
            self.close_connection = True  # not connected to NATS yet: EventSource retries a drop,
            return                        # never a 503
        except OSError:  # the sidecar is restarting: a dropped connection, so EventSource retries
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            with upstream:
                for line in upstream:  # SSE is line-framed: forward each line at once
                    self.wfile.write(line)
                    self.wfile.flush()
        except OSError:  # cut mid-stream (sidecar restart, or the browser left): close too
            pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("GATEWAY_PORT", "0"))), Handler)
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()
