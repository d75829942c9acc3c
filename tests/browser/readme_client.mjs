// Runs README.md's browser client (the <script> under "### A browser client") in headless
// Chromium, for tests/browser.rs, which starts the real servers and says what to do.
//
//   node readme_client.mjs README.md [CHROMIUM]      (CHROMIUM defaults to /usr/bin/chromium)
//
// Protocol: one JSON command per line on stdin, one JSON answer per line on stdout (the first
// line, unasked, says the browser is ready). Diagnostics go to stderr.
//
//   {"cmd":"open","page":"p1","server":"ws://127.0.0.1:PORT","stubs":{...}}
//        loads a page running the snippet, its `const server = ...` line pointed at `server`;
//        pages share one browser context, so localStorage persists from one page to the next
//   {"cmd":"wait","page":"p1","kind":"delivery","count":3,"timeout_ms":10000}
//        answers once the page has reported `count` events of that kind (or fails at the timeout)
//   {"cmd":"state","page":"p1"}          what the page has reported so far
//   {"cmd":"clock","page":"p1","offset_ms":60000}    moves the page's Date.now() forward
//   {"cmd":"close","page":"p1"}
//   {"cmd":"quit"}
//
// Every answer is {"ok":true,...} or {"ok":false,"error":"...",...}, with the page's "state":
// sockets (URLs opened), welcomes, deliveries ({seq, data} as showEmergency got them), pongs,
// sends ({data, readyState}), ticks (heartbeat runs, with the socket's readyState), delays
// (backoff setTimeout delays), closes (codes), errors (uncaught exceptions: `pageerror`), alerts.
//
// Stubs, installed before the snippet runs: `random` (Math.random returns it),
// `backoff_attempts` (setTimeout records its delay and runs at once, for that many reconnects,
// then no more), `heartbeat_ms` (setInterval runs every that many ms instead).

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { answer, launchChromium, serveCommands } from './driver.mjs';

const [readmePath, chromiumPath = '/usr/bin/chromium'] = process.argv.slice(2);
if (!readmePath) {
  console.error('usage: node readme_client.mjs README.md [CHROMIUM]');
  process.exit(2);
}

// The snippet, exactly as README.md shows it: the ```html block under "### A browser client".
function readmeSnippet(path) {
  const readme = readFileSync(path, 'utf8');
  const section = readme.split('\n### A browser client\n')[1];
  if (section === undefined) throw new Error(`${path}: no "### A browser client" section`);
  const block = /^```html\n([\s\S]*?)^```$/m.exec(section.split('\n## ')[0]);
  if (!block) throw new Error(`${path}: no \`\`\`html block under "### A browser client"`);
  const script = /^<script>\n([\s\S]*)^<\/script>\n$/m.exec(block[1]);
  if (!script) throw new Error(`${path}: the html block is not one <script> element`);
  const serverLines = script[1].match(/^const server = .*$/gm) || [];
  if (serverLines.length !== 1) {
    throw new Error(`${path}: the snippet needs exactly one "const server = ..." line, has ${serverLines.length}`);
  }
  return script[1];
}

const snippet = readmeSnippet(readmePath);

// Runs before the snippet: records what the page does through window.resqReport (exposed by
// Playwright), and installs the stubs a page asked for.
function harness(stubs) {
  const report = window.resqReport;
  const NativeWebSocket = window.WebSocket;
  const nativeSetTimeout = window.setTimeout.bind(window);
  const nativeSetInterval = window.setInterval.bind(window);
  const nativeNow = Date.now.bind(Date);
  let current = null;
  window.resqClock = { offset: 0 };
  Date.now = () => nativeNow() + window.resqClock.offset;
  window.WebSocket = class extends NativeWebSocket {
    constructor(...args) {
      super(...args);
      current = this;
      report('socket', { url: String(args[0]) });
      this.addEventListener('open', () => report('open', {}));
      this.addEventListener('close', (event) => report('close', { code: event.code }));
      this.addEventListener('message', (event) => {
        let msg;
        try {
          msg = JSON.parse(event.data);
        } catch {
          return;
        }
        // After this task, so the snippet's own onmessage has run (and stored what it stores).
        if (msg.type === 'connection') nativeSetTimeout(() => report('welcome', msg), 0);
        if (msg.type === 'pong') report('pong', {});
      });
    }
    send(data) {
      report('send', { data: String(data), readyState: this.readyState });
      return super.send(data);
    }
  };
  if (stubs.random !== undefined) Math.random = () => stubs.random;
  if (stubs.backoff_attempts !== undefined) {
    let left = stubs.backoff_attempts;
    window.setTimeout = (fn, delay, ...args) => {
      report('delay', { delay });
      if (left-- > 0) return nativeSetTimeout(fn, 0, ...args);
      return 0;
    };
  }
  if (stubs.heartbeat_ms !== undefined) {
    window.setInterval = (fn, _delay, ...args) =>
      nativeSetInterval(() => {
        report('tick', { readyState: current && current.readyState });
        fn(...args);
      }, stubs.heartbeat_ms);
  }
}

function pageHtml(server, stubs) {
  const pointed = snippet.replace(/^const server = .*$/m, `const server = ${JSON.stringify(server)};`);
  return `<!doctype html>
<meta charset="utf-8">
<title>README browser client</title>
<script>(${harness.toString()})(${JSON.stringify(stubs)});</script>
<script>
${pointed}</script>
<script>showEmergency = (data, seq) => resqReport('delivery', { seq, data });</script>
`;
}

const documents = new Map();
const http = createServer((request, response) => {
  if (request.url === '/favicon.ico') return response.writeHead(204).end();
  const html = documents.get(request.url);
  response.writeHead(html === undefined ? 404 : 200, { 'Content-Type': 'text/html; charset=utf-8' });
  response.end(html ?? 'not found');
});
await new Promise((resolve) => http.listen(0, '127.0.0.1', resolve));
const origin = `http://127.0.0.1:${http.address().port}`;

const browser = await launchChromium(chromiumPath);
const context = await browser.newContext();

const pages = new Map();

function state(record) {
  const of = (kind) => record.events.filter((event) => event.kind === kind).map((event) => event.payload);
  return {
    closed: record.closed,
    sockets: of('socket').map((socket) => socket.url),
    welcomes: of('welcome'),
    deliveries: of('delivery'),
    pongs: of('pong').length,
    sends: of('send'),
    ticks: of('tick').map((tick) => tick.readyState),
    delays: of('delay').map((delay) => delay.delay),
    closes: of('close').map((close) => close.code),
    errors: of('pageerror').map((error) => error.message),
    alerts: of('alert').map((alert) => alert.message),
  };
}

function count(record, kind) {
  return record.events.filter((event) => event.kind === kind).length;
}

function note(page, kind, payload) {
  page.events.push({ kind, payload });
  for (const waiter of [...page.waiters]) {
    if (count(page, waiter.kind) >= waiter.count) {
      page.waiters.delete(waiter);
      waiter.resolve();
    }
  }
}

async function open({ page: name, server, stubs = {} }) {
  if (pages.has(name)) throw new Error(`page ${name} exists`);
  const record = { events: [], waiters: new Set(), closed: false, page: null };
  pages.set(name, record);
  const path = `/${encodeURIComponent(name)}`;
  documents.set(path, pageHtml(server, stubs));
  const page = await context.newPage();
  record.page = page;
  page.on('pageerror', (error) => note(record, 'pageerror', { message: String(error.message) }));
  page.on('console', (message) => console.error(`[${name}] console.${message.type()}: ${message.text()}`));
  page.on('dialog', (dialog) => {
    note(record, 'alert', { message: dialog.message() });
    dialog.dismiss().catch(() => {});
  });
  await page.exposeFunction('resqReport', (kind, payload) => note(record, kind, payload));
  await page.goto(origin + path);
  return record;
}

function wait(record, { kind, count: wanted, timeout_ms = 10000 }) {
  if (count(record, kind) >= wanted) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const waiter = { kind, count: wanted, resolve };
    const timer = setTimeout(() => {
      record.waiters.delete(waiter);
      reject(new Error(`timed out after ${timeout_ms} ms waiting for ${wanted} ${kind} events (have ${count(record, kind)})`));
    }, timeout_ms);
    waiter.resolve = () => {
      clearTimeout(timer);
      resolve();
    };
    record.waiters.add(waiter);
  });
}

function known(name) {
  const record = pages.get(name);
  if (!record) throw new Error(`no page ${name}`);
  return record;
}

async function handle(command) {
  switch (command.cmd) {
    case 'open':
      return state(await open(command));
    case 'wait': {
      const record = known(command.page);
      await wait(record, command);
      return state(record);
    }
    case 'state':
      return state(known(command.page));
    case 'clock': {
      const record = known(command.page);
      await record.page.evaluate((offset) => (window.resqClock.offset = offset), command.offset_ms);
      return state(record);
    }
    case 'close': {
      const record = known(command.page);
      await record.page.close();
      record.closed = true;
      return state(record);
    }
    default:
      throw new Error(`unknown command ${JSON.stringify(command.cmd)}`);
  }
}

await serveCommands({
  browser,
  http,
  handle,
  stateOf: async (command) => {
    const record = pages.get(command.page);
    return record ? state(record) : null;
  },
});
