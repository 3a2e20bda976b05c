"""execution: the execution log. Every execution event, persisted once in SQLite.

Plain HTTP. POST /events/<service>/<event> comes from a wildcard JetStream consumer
(*.execution.*) in its sidecar. Each event is keyed by its stream and sequence, so a
redelivered copy finds its row and is not stored again; execution.log.created is
published once per row. GET /executions/<workflow id> reads the log (gateway, tunnelled).
"""
import json, os, sqlite3, sys, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EGRESS = os.environ.get("EGRESS_URL") or os.environ["NATSBRIDGE_URL"]  # `natsbridge dev` sets the latter
db = sqlite3.connect(os.environ["EXECUTION_DB"], check_same_thread=False, isolation_level=None)
db.execute("""CREATE TABLE IF NOT EXISTS events (
  stream TEXT NOT NULL, seq INTEGER NOT NULL, subject TEXT NOT NULL, workflow_id TEXT NOT NULL,
  msg_id TEXT, body TEXT NOT NULL, at REAL NOT NULL, notified INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (stream, seq))""")
lock = threading.Lock()


def notify(wf, subject, event_id):
    body = json.dumps({"workflow_id": wf, "subject": subject, "event_id": event_id}).encode()
    req = urllib.request.Request(EGRESS + "/log/created", body, {"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()


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
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _, _, service, event = self.path.split("/")
        subject, body = f"{service}.execution.{event}", json.loads(raw)
        stream, seq = self.headers["Bridge-Stream"], int(self.headers["Bridge-Seq"])
        with lock:
            db.execute("INSERT OR IGNORE INTO events (stream, seq, subject, workflow_id, msg_id, body, at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (stream, seq, subject, body["workflow_id"],
                                                         self.headers.get("Nats-Msg-Id"), raw.decode(), time.time()))
            notified = db.execute("SELECT notified FROM events WHERE stream = ? AND seq = ?", (stream, seq)).fetchone()[0]
        if not notified:
            notify(body["workflow_id"], subject, f"{stream}:{seq}")
            with lock:
                db.execute("UPDATE events SET notified = 1 WHERE stream = ? AND seq = ?", (stream, seq))
        self.answer(200, {"stored": f"{stream}:{seq}"})

    def do_GET(self):
        parts = self.path.split("/")
        if len(parts) != 3 or parts[1] != "executions":
            return self.answer(404, {"error": "no such route"})
        with lock:
            rows = db.execute("SELECT seq, subject, body, at FROM events WHERE workflow_id = ? ORDER BY seq",
                              (parts[2],)).fetchall()
        self.answer(200, [{"seq": s, "subject": subj, "event": json.loads(b), "at": at} for s, subj, b, at in rows])


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "0"))), Handler)  # PORT: from `natsbridge dev`
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()
