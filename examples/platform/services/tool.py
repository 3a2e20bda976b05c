"""tool: runs a tool for a request, and says when it starts and finishes.

Plain HTTP; POST /internal/run comes from a JetStream consumer in its sidecar. The tool's
effect (a line appended to TOOL_EFFECTS) happens once per request_id because the sidecar
keeps each request's result (idempotency = json:/request_id) and answers a second copy
from it. An input of "poison" is refused with 422 until POST /admin/fix: the sidecar
dead-letters it, and `natsbridge dlq replay` brings it back once fixed.
"""
import json, os, sys, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EGRESS = os.environ["EGRESS_URL"]
EFFECTS = os.environ["TOOL_EFFECTS"]
fixed = False


def call(path, body, key):
    req = urllib.request.Request(EGRESS + path, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Idempotency-Key": key})
    urllib.request.urlopen(req, timeout=15).read()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        global fixed
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/admin/fix":
            fixed = True
            return self.answer(200, {"fixed": True})
        wf, rid, text = body["workflow_id"], body["request_id"], body["input"]
        if text == "poison" and not fixed:
            return self.answer(422, {"error": "the wordcount tool cannot read this input"})
        call(f"/tools/{wf}/started", {"workflow_id": wf, "request_id": rid}, f"{rid}-started")
        result = f"{len(text.split())} words"
        with open(EFFECTS, "a") as f:  # the effect that must happen once
            f.write(json.dumps({"request_id": rid, "result": result}) + "\n")
        call(f"/tools/{wf}/completed", {"workflow_id": wf, "request_id": rid, "result": result}, f"{rid}-completed")
        self.answer(200, {"result": result})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()
