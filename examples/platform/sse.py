"""A token-stream reader that behaves like the page's EventSource: reads a workflow's SSE
stream from gateway and, when the connection drops, reconnects with Last-Event-ID (the id
of the last event it got) until the `done` token arrives.

    python3 sse.py URL OUT.jsonl CUT_FILE N[,N…]

Writes one line per event to OUT.jsonl ({"conn", "sent_last_event_id", "id", "data"}) and
creates CUT_FILE.N once N events arrived, for each N, so the demo knows when to restart a
sidecar mid-stream. Exits 0 after the `done` token, 1 after 60 s without it.
"""
import json, sys, time, urllib.request

url, out_path, cut_path, cuts = sys.argv[1], sys.argv[2], sys.argv[3], {int(n) for n in sys.argv[4].split(",")}
last_id, conn, got = None, 0, 0
deadline = time.monotonic() + 60
with open(out_path, "w") as out:
    while time.monotonic() < deadline:
        conn += 1
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as r:
                event = {}
                for raw in r:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("id: "):
                        event["id"] = line[4:]
                    elif line.startswith("data: "):
                        event["data"] = event.get("data", "") + line[6:]
                    elif line == "" and "data" in event:
                        last_id = event.get("id", last_id)
                        out.write(json.dumps({"conn": conn, "sent_last_event_id": headers.get("Last-Event-ID"), **event}) + "\n")
                        out.flush()
                        got += 1
                        if got in cuts:
                            open(f"{cut_path}.{got}", "w").close()
                        if json.loads(event["data"]).get("done"):
                            sys.exit(0)
                        event = {}
                    elif line == "":
                        event = {}
        except OSError as e:  # refused while the sidecar restarts, or cut mid-stream
            print(f"sse: connection {conn}: {e}", file=sys.stderr)
        time.sleep(0.1)
print("sse: no done token within 60 s", file=sys.stderr)
sys.exit(1)
