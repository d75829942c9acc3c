// What both browser drivers share (readme_client.mjs, console.mjs): Chromium launched as this
// machine allows it, and the line protocol: one JSON command per line on stdin, one JSON answer
// per line on stdout (the first, unasked, says the browser is ready), diagnostics on stderr.

import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

/// Debian's Chromium, headless, without the background traffic this closed network refuses.
export async function launchChromium(executablePath, extraArgs = []) {
  const launching = Date.now();
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    chromiumSandbox: false,
    args: [
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      ...extraArgs,
    ],
  });
  console.error(`launching Chromium ${browser.version()}: ${Date.now() - launching} ms`);
  return browser;
}

export function answer(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/// Answers each command with `handle(command)` (`{"ok":true,"state":...}`) or its error (with
/// `stateOf(command)`, the page's state if there is one) until `quit`; then closes the browser
/// and `http`, the server the driver serves its own pages from.
export async function serveCommands({ browser, http, handle, stateOf }) {
  answer({ ok: true, ready: true, browser: browser.version() });
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    let command;
    try {
      command = JSON.parse(line);
    } catch (error) {
      answer({ ok: false, error: `not JSON: ${error.message}` });
      continue;
    }
    if (command.cmd === 'quit') break;
    const started = Date.now();
    try {
      answer({ ok: true, state: await handle(command) });
      console.error(`${line}: ${Date.now() - started} ms`);
    } catch (error) {
      answer({ ok: false, error: String(error.message), state: await stateOf(command) });
    }
  }
  const closing = Date.now();
  await browser.close();
  console.error(`closing the browser: ${Date.now() - closing} ms`);
  http.close();
  answer({ ok: true, quit: true });
}
