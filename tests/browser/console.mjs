// Drives the operators' console (the server's own page at /) in headless Chromium, for
// tests/browser_console.rs, which starts the real servers, publishes, and says what to do.
//
//   node console.mjs [CHROMIUM]      (CHROMIUM defaults to /usr/bin/chromium)
//
// Protocol: one JSON command per line on stdin, one JSON answer per line on stdout (the first
// line, unasked, says the browser is ready). Diagnostics go to stderr. Each page has a browser
// context of its own (its own localStorage), as two tablets would.
//
//   {"cmd":"open","page":"a","url":"http://127.0.0.1:PORT/?token=...","viewport":{"width":600,"height":960}}
//        (the viewport defaults to 1024 x 700, a tablet in landscape)
//   {"cmd":"open_readme","page":"m","readme":"README.md","server":"http://127.0.0.1:PORT"}
//        loads the ```html block under "### The client module" in README.md, served by this
//        script (another origin: the server needs --allowed-origin), with its
//        http://localhost:8000 pointed at `server`; its snapshot is {title, list} (its items)
//   {"cmd":"wait","page":"a","until":{...},"timeout_ms":10000}
//        answers once the page's snapshot matches every member of `until`:
//          state: "open"                  the connection state (body[data-state])
//          cards: N                       at least N cards in the list
//          card: {seq, has, lacks, seen_by, fields}   card `seq` has/lacks a class, its "visto por"
//                                         text contains seen_by, it shows each of `fields` as given
//          alarm: "on"                    body[data-alarm]
//          roster_connected: N            at least N tablets shown connected
//          banner: "down"                 that banner shown (down, missed, stream, token)
//          list: N, title: "open"         (README's module page) at least N items, the title
//   {"cmd":"click","page":"a","selector":"..."}     a real click (pointer events: a user gesture)
//   {"cmd":"reload","page":"a"}                    reloads the page (its storage stays)
//   {"cmd":"state","page":"a"}
//   {"cmd":"screenshot","page":"a","path":"/tmp/x.png"}
//   {"cmd":"close","page":"a"}
//
// Every answer is {"ok":true,"state":...} or {"ok":false,"error":"...","state":...}; the state is
// the page's snapshot plus `errors` (uncaught exceptions) and `console` (console messages of
// type error or warning, with the time they came, and network failures).

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { answer, launchChromium, serveCommands } from './driver.mjs';

const [chromiumPath = '/usr/bin/chromium'] = process.argv.slice(2);

const browser = await launchChromium(chromiumPath, ['--autoplay-policy=user-gesture-required']);

const pages = new Map();

// The README's frontend, exactly as README.md shows it, its server pointed at the test's.
function readmeModulePage(path, server) {
  const readme = readFileSync(path, 'utf8');
  const section = readme.split('\n### The client module\n')[1];
  if (section === undefined) throw new Error(`${path}: no "### The client module" section`);
  const block = /^```html\n([\s\S]*?)^```$/m.exec(section.split('\n### ')[0]);
  if (!block) throw new Error(`${path}: no \`\`\`html block under "### The client module"`);
  if (!block[1].includes('http://localhost:8000')) throw new Error(`${path}: the block never names http://localhost:8000`);
  return `<!doctype html>\n<meta charset="utf-8">\n<title>README module</title>\n${block[1].replaceAll('http://localhost:8000', server)}`;
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

// Runs in the page: what an operator sees, as data.
function snapshot(until) {
  const $ = (id) => document.getElementById(id);
  if (!$('state-text')) {
    const page = { title: document.title, list: [...document.querySelectorAll('#list li')].map((li) => li.textContent) };
    if (!until) return page;
    const fits = (until.list === undefined || page.list.length >= until.list) && (until.title === undefined || page.title === until.title);
    return fits ? page : false;
  }
  const cards = [...document.querySelectorAll('#list > li')].map((li) => ({
    seq: Number(li.dataset.seq),
    classes: [...li.classList],
    seen_by: li.querySelector('.seen-by').textContent,
    fields: Object.fromEntries(
      [...li.querySelectorAll('.fields dt')].map((dt) => [dt.textContent, dt.nextElementSibling.textContent]),
    ),
    badge: li.querySelector('.badge').textContent,
  }));
  const banners = ['down', 'missed', 'stream', 'token'].filter((name) => !$(`banner-${name}`).hidden);
  const state = {
    state: document.body.dataset.state,
    state_text: $('state-text').textContent,
    alarm: document.body.dataset.alarm,
    banners,
    cards,
    roster: [...document.querySelectorAll('#roster li[data-name]')].map((li) => ({
      name: li.dataset.name,
      connected: li.classList.contains('connected'),
      text: li.textContent,
    })),
    counters: {
      unseen: $('count-unseen').textContent,
      received: $('count-received').textContent,
      clients: $('count-clients').textContent,
      seq: $('count-seq').textContent,
    },
    transport: $('server-transport').textContent,
    // The layout: whether the page scrolls sideways, and where the side panel sits.
    layout: {
      overflows: document.documentElement.scrollWidth > window.innerWidth,
      side_beside_list: $('side').getBoundingClientRect().left >= $('feed').getBoundingClientRect().right,
      seen_button_width: (() => {
        const button = document.querySelector('#list .card.new .seen');
        return button ? button.getBoundingClientRect().width : null;
      })(),
    },
    notes: [$('wake-note').textContent, $('notify-note').textContent],
  };
  if (!until) return state;
  const matches = Object.entries(until).every(([key, want]) => {
    switch (key) {
      case 'state':
      case 'alarm':
        return state[key] === want;
      case 'cards':
        return cards.length >= want;
      case 'banner':
        return banners.includes(want);
      case 'roster_connected':
        return state.roster.filter((tablet) => tablet.connected).length >= want;
      case 'card': {
        const card = cards.find((c) => c.seq === want.seq);
        if (!card) return false;
        if (want.has && !card.classes.includes(want.has)) return false;
        if (want.lacks && card.classes.includes(want.lacks)) return false;
        if (want.fields && Object.entries(want.fields).some(([name, value]) => card.fields[name] !== value)) return false;
        return !want.seen_by || card.seen_by.includes(want.seen_by);
      }
      default:
        throw new Error(`unknown condition ${key}`);
    }
  });
  return matches ? state : false;
}

async function state(record) {
  let page = null;
  if (!record.closed) page = await record.page.evaluate(snapshot, null).catch((error) => ({ unreadable: String(error.message) }));
  return { ...page, errors: record.errors, console: record.console };
}

async function open({ page: name, url, viewport = { width: 1024, height: 700 } }) {
  if (pages.has(name)) throw new Error(`page ${name} exists`);
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
  const page = await context.newPage();
  const record = { page, context, errors: [], console: [], closed: false, opened: Date.now() };
  pages.set(name, record);
  const at = () => Date.now() - record.opened;
  page.on('pageerror', (error) => record.errors.push(String(error.message)));
  page.on('dialog', (dialog) => {
    record.console.push({ at_ms: at(), type: 'dialog', text: dialog.message() });
    dialog.dismiss().catch(() => {});
  });
  page.on('console', (message) => {
    console.error(`[${name}] console.${message.type()}: ${message.text()}`);
    if (message.type() === 'error' || message.type() === 'warning') {
      record.console.push({ at_ms: at(), type: message.type(), text: message.text() });
    }
  });
  await page.goto(url);
  return record;
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
    case 'open_readme': {
      const path = `/${encodeURIComponent(command.page)}`;
      documents.set(path, readmeModulePage(command.readme, command.server));
      return state(await open({ page: command.page, url: origin + path }));
    }
    case 'wait': {
      const record = known(command.page);
      const timeout = command.timeout_ms ?? 10000;
      await record.page.waitForFunction(snapshot, command.until, { timeout, polling: 50 });
      return state(record);
    }
    case 'click': {
      const record = known(command.page);
      await record.page.click(command.selector);
      return state(record);
    }
    case 'reload': {
      const record = known(command.page);
      await record.page.reload();
      return state(record);
    }
    case 'state':
      return state(known(command.page));
    case 'screenshot': {
      const record = known(command.page);
      await record.page.screenshot({ path: command.path });
      return state(record);
    }
    case 'close': {
      const record = known(command.page);
      const last = await state(record);
      await record.context.close();
      record.closed = true;
      return last;
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
    return record ? await state(record) : null;
  },
});
