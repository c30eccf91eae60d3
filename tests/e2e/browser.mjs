// One headless Chromium (Debian's /usr/bin/chromium) driven by playwright-core, for pytest.
//
// stdin:  one JSON command per line; each may carry `req`, echoed in the reply.
//   launch {spki, origin, executable?}  start Chromium with the dev-certificate flags
//   open {url}                          open a page (one page per driver)
//   eval {expr}                         evaluate a JS expression in the page, reply its value
//   wait {expr, timeout}                wait until the expression is truthy in the page
//   screenshot {path}                   full-page PNG
//   exit                                close the browser and exit
// stdout: one JSON event per line: ready {pid}, ok {req, value}, error {req?, message},
//   console {type, text} (the page's console), pageerror {message}, disconnected.
//
// No --disable-quic (WebTransport is QUIC); --origin-to-force-quic-on makes Chromium use
// HTTP/3 for the page too, and the SPKI flag makes it accept the node's dev certificate.

import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

/** @param {Record<string, unknown>} obj */
function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

/** @param {unknown} e */
function describe(e) {
  return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
}

/** @type {import('playwright-core').BrowserServer | null} */
let server = null;
/** @type {import('playwright-core').Browser | null} */
let browser = null;
/** @type {import('playwright-core').Page | null} */
let page = null;

async function shutdown(code = 0) {
  try {
    if (server) await server.close();
  } catch {
    // already gone (killed by the test)
  }
  process.exit(code);
}

/** @param {Record<string, any>} cmd */
async function handle(cmd) {
  switch (cmd.cmd) {
    case 'launch': {
      // launchServer() rather than launch(): only a BrowserServer exposes the process,
      // and the test needs its pid to kill Chromium the hard way.
      server = await chromium.launchServer({
        executablePath: cmd.executable || '/usr/bin/chromium',
        headless: true,
        chromiumSandbox: false, // adds --no-sandbox: we run as root in CI
        // Playwright gives every browser a fresh temporary --user-data-dir and removes it.
        timeout: 30_000,
        args: [
          '--disable-gpu',
          '--no-first-run',
          '--disable-background-networking',
          '--disable-component-update',
          '--disable-sync',
          `--ignore-certificate-errors-spki-list=${cmd.spki}`,
          `--origin-to-force-quic-on=${cmd.origin}`,
        ],
      });
      browser = await chromium.connect(server.wsEndpoint());
      browser.on('disconnected', () => emit({ ev: 'disconnected' }));
      return { pid: server.process().pid, version: browser.version() };
    }
    case 'open': {
      if (!browser) throw new Error('launch first');
      const context = await browser.newContext({ viewport: { width: 1000, height: 760 } });
      page = await context.newPage();
      page.on('console', (m) => emit({ ev: 'console', type: m.type(), text: m.text() }));
      page.on('pageerror', (e) => emit({ ev: 'pageerror', message: describe(e) }));
      const response = await page.goto(cmd.url, { waitUntil: 'load', timeout: 15_000 });
      return { status: response?.status() };
    }
    case 'eval':
      if (!page) throw new Error('open first');
      return await page.evaluate(cmd.expr);
    case 'wait':
      if (!page) throw new Error('open first');
      await page.waitForFunction(cmd.expr, null, { timeout: cmd.timeout ?? 10_000, polling: 50 });
      return await page.evaluate(cmd.expr);
    case 'screenshot':
      if (!page) throw new Error('open first');
      await page.screenshot({ path: cmd.path, fullPage: true });
      return cmd.path;
    case 'exit':
      await shutdown(0);
      return null;
    default:
      throw new Error(`unknown command ${cmd.cmd}`);
  }
}

process.on('unhandledRejection', (e) => emit({ ev: 'error', message: 'unhandled ' + describe(e) }));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => shutdown(1));

const lines = createInterface({ input: process.stdin });
lines.on('close', () => shutdown(0)); // pytest went away: never leave a browser behind
lines.on('line', async (line) => {
  /** @type {Record<string, any>} */
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    emit({ ev: 'error', message: 'bad command line: ' + describe(e) });
    return;
  }
  try {
    emit({ ev: 'ok', req: cmd.req, value: await handle(cmd) });
  } catch (e) {
    emit({ ev: 'error', req: cmd.req, message: describe(e) });
  }
});
emit({ ev: 'ready', pid: process.pid });
