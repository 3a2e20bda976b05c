"""vector: a tiny document store; search answers the documents sharing most words.

Plain HTTP: POST /search and POST /upsert, reached over NATS request/reply through its
sidecar (vector.search.requested, vector.upsert.requested).
"""
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

docs = {"d1": "NATS carries messages between services", "d2": "JetStream keeps messages until they are acked",
        "d3": "sidecars move HTTP services onto NATS"}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with lock:
            if self.path == "/search":
                words = set(body["query"].lower().split())
                ranked = sorted(docs.items(), key=lambda d: -len(words & set(d[1].lower().split())))
                out = [{"id": i, "text": t} for i, t in ranked[: body.get("k", 2)]]
            elif self.path == "/upsert":
                docs[body["id"]] = body["text"]
                out = {"id": body["id"], "stored": True}
            else:
                out = None
        data = json.dumps(out).encode()
        self.send_response(200 if out is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "0"))), Handler)  # PORT: from `natsbridge dev`
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()
