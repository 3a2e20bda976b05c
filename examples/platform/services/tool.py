"""tool: runs a tool for a request, and says when it starts and finishes.

Plain HTTP; POST /internal/run comes from a JetStream consumer in its sidecar. The tool's
effect (a line appended to TOOL_EFFECTS) happens once per request_id: a second copy of a
request the sidecar already answered is answered from its idempotency store (idempotency =
json:/request_id), and a redelivery of one whose effect happened but whose answer failed
reaches the tool, which remembers its results by request_id and answers from them. Every
delivery is appended to TOOL_DELIVERIES with its Bridge-Delivery count.

A request marked `redeliver_once` shows the second case for real: the tool performs its
effect, then answers 503 on the first delivery (as if it crashed before answering), its
sidecar naks, and JetStream redelivers it (Bridge-Delivery: 2). An input of "poison" is
refused with 422 until POST /admin/fix: the sidecar dead-letters it, and `natsbridge dlq
replay` brings it back once fixed.
"""
import json, os, sys, threading, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EGRESS = os.environ.get("EGRESS_URL") or os.environ["NATSBRIDGE_URL"]  # `natsbridge dev` sets the latter
EFFECTS = os.environ["TOOL_EFFECTS"]
DELIVERIES = os.environ.get("TOOL_DELIVERIES", EFFECTS + ".deliveries")
fixed = False
results, lock = {}, threading.Lock()  # request_id -> result: the tool's own idempotency


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
        delivery = int(self.headers.get("Bridge-Delivery") or 0)
        with lock:  # one request at a time per tool: the effect and its record stay together
            effect = rid not in results
            if effect and not (text == "poison" and not fixed):
                call(f"/tools/{wf}/started", {"workflow_id": wf, "request_id": rid}, f"{rid}-started")
                results[rid] = f"{len(text.split())} words"
                with open(EFFECTS, "a") as f:  # the effect that must happen once
                    f.write(json.dumps({"request_id": rid, "result": results[rid]}) + "\n")
                call(f"/tools/{wf}/completed", {"workflow_id": wf, "request_id": rid, "result": results[rid]}, f"{rid}-completed")
            with open(DELIVERIES, "a") as f:
                f.write(json.dumps({"request_id": rid, "delivery": delivery, "effect": effect and rid in results}) + "\n")
        if rid not in results:
            return self.answer(422, {"error": "the wordcount tool cannot read this input"})
        if body.get("redeliver_once") and delivery == 1:
            return self.answer(503, {"error": "answered 503 after the effect, once: JetStream redelivers"})
        self.answer(200, {"result": results[rid]})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "0"))), Handler)  # PORT: from `natsbridge dev`
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()
