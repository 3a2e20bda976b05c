// An app that knows nothing of natsbridge, for tests/forward.rs: Node's fetch and WebSocket
// from undici, with EnvHttpProxyAgent taking HTTP_PROXY/HTTPS_PROXY/NO_PROXY from the
// environment as apps do. By default undici tunnels every call through CONNECT, plain
// http:// ones too. Prints one line per call: `<name> <status> <body>`. The calls come from
// ROUTED_URL, UNROUTED_URL, HTTPS_URL (trusting NODE_EXTRA_CA_CERTS) and WS_URL.
import { EnvHttpProxyAgent, WebSocket, fetch, setGlobalDispatcher } from 'undici';

setGlobalDispatcher(new EnvHttpProxyAgent());
const env = process.env;

async function call(name, url, init) {
  const res = await fetch(url, { ...init, signal: AbortSignal.timeout(30_000) });
  console.log(name, res.status, await res.text());
}

function websocketEcho(url, text) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.onopen = () => ws.send(text);
    ws.onmessage = (event) => {
      resolve(event.data);
      ws.close();
    };
    ws.onerror = (event) => reject(new Error(`websocket: ${event.message ?? event.type}`));
  });
}

if (env.ROUTED_URL) await call('routed', env.ROUTED_URL, { method: 'POST', body: '{"task":"x"}' });
if (env.UNROUTED_URL) await call('unrouted', env.UNROUTED_URL, { method: 'POST', body: 'uuuuu' });
if (env.HTTPS_URL) await call('https', env.HTTPS_URL);
if (env.WS_URL) console.log('websocket', 101, await websocketEcho(env.WS_URL, 'hello over the proxy'));
