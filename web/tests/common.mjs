// What every browser test of `ray web` starts with: its settings from the environment the
// e2e test (tests/e2e/web.rs) passes, assertions that log what held, and Debian's chromium.
import { existsSync, mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

export const CHROMIUM = '/usr/bin/chromium';

// A setting the e2e test must pass.
export function need(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: this script is run by the e2e test tests/e2e/web.rs`);
  return v;
}

// Throws (the script exits non-zero) unless `cond` holds; logs what held.
export function check(cond, what) {
  if (!cond) throw new Error(`FAILED: ${what}`);
  console.log(`ok: ${what}`);
}

// Debian's chromium, headless, with nothing reaching beyond the machine; screenshots go
// to `artifacts`.
export async function launch(artifacts) {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: scripts/setup installs Debian's chromium (apt-get install chromium)`);
  }
  mkdirSync(artifacts, { recursive: true });
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
}

/** The serial console's text (xterm.js buffer) in the page. */
export async function termText(page) {
  return page.evaluate(() => {
    const b = window.rayTerm.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
    return lines.join('\n');
  });
}

/** Waits until the serial console shows `text`. */
export async function waitTerm(page, text, ms = 20000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if ((await termText(page)).includes(text)) return;
    await page.waitForTimeout(100);
  }
  throw new Error(`FAILED: the serial console never showed ${JSON.stringify(text)}; it shows:\n${await termText(page)}`);
}
