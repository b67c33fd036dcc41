// Drives docs/examples/browser/index.html in headless Chromium for tests/browser.rs.
//
// Usage: CHROMIUM=/usr/bin/chromium node browser.mjs <user-data-dir> <screenshot.png>
//
// The test owns the gateways and tells this script, one JSON line on stdin at a time, what to open
// and what the page should come to show; the script answers each with one JSON line on stdout:
//   {"goto": "<url>"}                     open the page
//   {"entries": "greeting", "count": 2}   wait until the log shows 2 `greeting` entries
//   {"text": "#opens", "is": "2"}         wait until that element's text is "2"
//   {"finish": true}                      take the screenshot and report what the page shows
// Answers: {"ok": true} once the page shows it (within STEP_MS), {"done": {...}} to "finish".
// The first line, {"ok": true}, says the browser is ready. Any failure, or LIMIT_MS in all, prints
// {"failed": "<why>"} and exits 1; the browser is closed either way.
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const LIMIT_MS = Number(process.env.BROWSER_LIMIT_MS || 45_000);
const STEP_MS = 20_000;

const [userDataDir, screenshot] = process.argv.slice(2);
if (!userDataDir || !screenshot) {
  console.error('usage: node browser.mjs <user-data-dir> <screenshot.png>');
  process.exit(64);
}
const answer = (line) => console.log(JSON.stringify(line));
let page = null;
let finished = false;

// A persistent context, so that Chromium's profile lives in a directory the test chose and can
// find stray processes by.
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1000, height: 700 },
  args: [
    '--no-sandbox', // needed as root
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
const limit = setTimeout(() => fail(new Error(`gave up after ${LIMIT_MS} ms`)), LIMIT_MS);

async function finish(code) {
  if (finished) return;
  finished = true;
  clearTimeout(limit);
  await context.close().catch(() => {});
  process.exit(code);
}

async function fail(error) {
  if (finished) return;
  console.error(error?.stack ?? String(error));
  if (page) await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
  answer({ failed: String(error?.message ?? error) });
  await finish(1);
}

async function run(command) {
  if (command.goto) {
    await page.goto(command.goto, { timeout: STEP_MS });
    answer({ ok: true });
  } else if (command.entries) {
    const entry = page.locator(`#log li[data-type="${command.entries}"]`);
    await entry.nth(command.count - 1).waitFor({ timeout: STEP_MS });
    answer({ ok: true });
  } else if (command.text) {
    await page.waitForFunction(
      ([selector, text]) => document.querySelector(selector)?.textContent === text,
      [command.text, command.is],
      { timeout: STEP_MS },
    );
    answer({ ok: true });
  } else if (command.finish) {
    await page.screenshot({ path: screenshot, fullPage: true });
    answer({ done: await shown() });
    await finish(0);
  } else {
    throw new Error(`unknown command ${JSON.stringify(command)}`);
  }
}

// What the page displays, for the test's assertions.
async function shown() {
  return {
    state: await page.textContent('#state'),
    opens: await page.textContent('#opens'),
    url: page.url(),
    log: await page.$$eval('#log li', (items) =>
      items.map((li) => ({
        type: li.dataset.type,
        lastEventId: li.dataset.lastEventId,
        data: li.querySelector('.data').textContent,
      })),
    ),
  };
}

try {
  page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (msg) => console.error(`[page ${msg.type()}] ${msg.text()}`));
  page.on('pageerror', (error) => console.error(`[page error] ${error.message}`));
  answer({ ok: true });
  // One command at a time, in order; the end of stdin without "finish" is a failure.
  for await (const line of createInterface({ input: process.stdin })) {
    if (line.trim()) await run(JSON.parse(line));
  }
  throw new Error('stdin ended before "finish"');
} catch (error) {
  await fail(error);
}
