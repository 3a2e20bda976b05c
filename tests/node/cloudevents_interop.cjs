// The independent side of tests/cloudevents.rs: the `cloudevents` npm SDK (pinned in
// package.json) writes the events sent to the sidecar and reads the ones it delivers.
//
//   node cloudevents_interop.cjs emit <url> <binary|structured|plain> '<event JSON>' ['<headers JSON>']
//       POSTs the event as the SDK writes it for HTTP (plain: its data only, with the
//       headers given); prints {"status", "body"}.
//   node cloudevents_interop.cjs receive
//       An HTTP app on 127.0.0.1:0 (prints {"port"} first). Each request is read with the
//       SDK's HTTP.toEvent and validated; prints {"event": <its attributes and data>} or
//       {"error": "..."}, and answers 200 (400 when the SDK refused it).
"use strict";
const http = require("node:http");
const { CloudEvent, HTTP } = require("cloudevents");

const [, , mode, ...args] = process.argv;
const print = (v) => process.stdout.write(JSON.stringify(v) + "\n");

async function emit(url, kind, eventJson, headersJson) {
  let headers, body;
  if (kind === "plain") {
    headers = { "content-type": "application/json", ...JSON.parse(headersJson || "{}") };
    body = JSON.stringify(JSON.parse(eventJson).data);
  } else {
    const event = new CloudEvent(JSON.parse(eventJson));
    const message = kind === "binary" ? HTTP.binary(event) : HTTP.structured(event);
    headers = message.headers;
    body = typeof message.body === "string" ? message.body : JSON.stringify(message.body);
  }
  const res = await fetch(url, { method: "POST", headers, body });
  print({ status: res.status, body: await res.text() });
}

function receive() {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      try {
        const event = HTTP.toEvent({ headers: req.headers, body: Buffer.concat(chunks).toString("utf8") });
        event.validate();
        print({ event: event.toJSON(), mode: req.headers["content-type"] });
        res.writeHead(200).end("ok");
      } catch (e) {
        print({ error: String(e && e.message ? e.message : e), errors: e && e.errors });
        res.writeHead(400).end("not a CloudEvent");
      }
    });
  });
  server.listen(0, "127.0.0.1", () => print({ port: server.address().port }));
}

if (mode === "emit") {
  emit(...args).catch((e) => {
    print({ error: String(e) });
    process.exit(1);
  });
} else if (mode === "receive") {
  receive();
} else {
  console.error("usage: cloudevents_interop.cjs emit|receive …");
  process.exit(2);
}
