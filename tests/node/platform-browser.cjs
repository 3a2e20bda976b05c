// Drives headless Chromium over the DevTools protocol (undici's WebSocket) through the
// platform's page: opens it, clicks Start, waits until the page shows the whole token
// stream and the workflow's end, saves a screenshot and prints what the page shows (JSON).
//
//   node platform-browser.cjs CHROMIUM PAGE_URL SCREENSHOT.png
'use strict';
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { WebSocket } = require('undici');

const [chromium, pageUrl, shot] = process.argv.slice(2);
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'platform-chromium-'));
const browser = spawn(chromium, ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
  '--no-first-run', '--remote-debugging-port=0', `--user-data-dir=${profile}`, '--window-size=1000,900', 'about:blank'],
  { stdio: ['ignore', 'ignore', 'pipe'] });
let stderr = '';
browser.stderr.on('data', (d) => { stderr += d; });
const fail = (msg) => { console.error(`platform-browser: ${msg}\n${stderr.slice(-2000)}`); finish(1); };
// Chromium's helper processes may still write to the profile for a moment after the kill.
const finish = (code) => {
  browser.once('exit', () => {
    try { fs.rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 }); } catch (e) { console.error(`platform-browser: ${e}`); }
    process.exit(code);
  });
  browser.kill('SIGKILL');
};
setTimeout(() => fail('no result within 60 s'), 60000).unref();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, f, ms = 30000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

async function main() {
  const portFile = path.join(profile, 'DevToolsActivePort');
  const port = await until('DevToolsActivePort', () => fs.existsSync(portFile) && fs.readFileSync(portFile, 'utf8').split('\n')[0]);
  const targets = await until('a page target', async () => {
    const list = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
    return list.find((t) => t.type === 'page');
  });
  const ws = new WebSocket(targets.webSocketDebuggerUrl);
  await new Promise((ok, ko) => { ws.onopen = ok; ws.onerror = () => ko(new Error('devtools websocket')); });
  let id = 0;
  const pending = new Map();
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.id && pending.has(msg.id)) { pending.get(msg.id)(msg); pending.delete(msg.id); }
  };
  const send = (method, params = {}) => new Promise((ok, ko) => {
    pending.set(++id, (msg) => (msg.error ? ko(new Error(`${method}: ${msg.error.message}`)) : ok(msg.result)));
    ws.send(JSON.stringify({ id, method, params }));
  });
  const js = async (expr) => (await send('Runtime.evaluate', { expression: expr, returnByValue: true, awaitPromise: true })).result.value;

  await send('Page.enable');
  await send('Page.navigate', { url: pageUrl });
  await until('the page', () => js("document.readyState === 'complete' && !!document.querySelector('#start button')"));
  await js("document.querySelector('#start button').click()");
  const state = () => js(`JSON.stringify({
    workflow: document.getElementById('wf').textContent,
    status: document.getElementById('status').textContent,
    tokens: document.getElementById('tokens').textContent,
    tokens_done: document.getElementById('tokens').dataset.done === 'true',
    log: [...document.querySelectorAll('#log tr')].map((r) => r.children[1].textContent),
  })`);
  const shown = await until('tokens and the end of the workflow', async () => {
    const s = JSON.parse(await state());
    return s.tokens_done && (s.status === 'completed' || s.status === 'failed') && s;
  });
  const png = await send('Page.captureScreenshot', { format: 'png' });
  fs.mkdirSync(path.dirname(shot), { recursive: true });
  fs.writeFileSync(shot, Buffer.from(png.data, 'base64'));
  console.log(JSON.stringify(shown));
  finish(0);
}
main().catch((e) => fail(e.stack || String(e)));
