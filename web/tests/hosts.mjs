// The hosts page of `ray web --cluster`, in Debian's chromium driven by playwright-core.
// Run by the e2e test `web::the_hosts_page_...` (tests/e2e/web.rs), which starts
// `ray controller` and `ray agent` on the single-host store, a cluster VM, and
// `ray web --cluster`, and passes:
//   RAY_WEB_URL, RAY_WEB_ADMIN, RAY_WEB_VIEWER, RAY_WEB_ARTIFACTS (as browser.mjs)
//   RAY_WEB_HOST        the agent's host name;  RAY_WEB_CLUSTER_VM  the cluster VM on it
import { check, launch, need } from './common.mjs';

const url = need('RAY_WEB_URL');
const adminToken = need('RAY_WEB_ADMIN');
const viewerToken = need('RAY_WEB_VIEWER');
const artifacts = need('RAY_WEB_ARTIFACTS');
const HOST = need('RAY_WEB_HOST');
const VM = need('RAY_WEB_CLUSTER_VM');


const browser = await launch(artifacts);

async function login(ctx, token) {
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
  await page.goto(url);
  await page.waitForSelector('#token');
  await page.fill('#token', token);
  await page.click('button[type=submit]');
  await page.waitForSelector('#who:not(:empty)');
  return page;
}

const row = `#hosts tr[data-host="${HOST}"]`;
const stateIs = (page, s, timeout = 30000) => page.waitForSelector(`${row} [data-state="${s}"]`, { timeout });

try {
  const admin = await login(await browser.newContext({ viewport: { width: 1280, height: 720 } }), adminToken);
  await admin.click('#nav-hosts');
  await stateIs(admin, 'Ready');
  check(true, `the hosts page lists ${HOST} Ready (live from the cluster store)`);
  await admin.waitForSelector(`${row} .vm[data-vm="${VM}"]`, { timeout: 30000 });
  check(true, `the cluster VM ${VM} appears on ${HOST}`);
  const cells = await admin.textContent(row);
  check(cells.includes('worker') && /\d+\/\d+ vCPUs/.test(cells) && cells.includes('MiB'),
    `the host row shows its role and load (${cells.trim()})`);
  await admin.screenshot({ path: `${artifacts}/hosts.png`, fullPage: true });

  // ---- a viewer sees the hosts and may change none of them: the server refuses ----
  const viewer = await login(await browser.newContext({ viewport: { width: 390, height: 844 } }), viewerToken);
  await viewer.goto(`${url}/#/hosts`);
  await stateIs(viewer, 'Ready');
  check(await viewer.isDisabled(`${row} button[data-op=drain]`), 'the drain button is disabled for a viewer');
  const refusals = await viewer.evaluate(async (host) => {
    const out = {};
    for (const op of ['drain', 'cordon', 'uncordon', 'drain-abort']) {
      const r = await fetch(`/api/hosts/${host}/${op}`, { method: 'POST' });
      out[op] = { status: r.status, body: await r.json() };
    }
    return out;
  }, HOST);
  check(Object.values(refusals).every((r) => r.status === 403 && r.body.code === 'forbidden' && r.body.message.includes('operator')),
    `the server refuses a viewer's host actions with 403 (${JSON.stringify(refusals)})`);
  const after = await viewer.evaluate(async () => (await (await fetch('/api/hosts')).json()));
  const h = after.hosts.find((x) => x.host === HOST);
  check(h && !h.draining && !h.cordoned && h.state === 'Ready', `the viewer's refused drain changed nothing (${JSON.stringify(h)})`);
  const overflow = await viewer.evaluate(() => document.documentElement.scrollWidth);
  check(overflow <= 390, `hosts page on a phone: no horizontal overflow (content ${overflow}px)`);
  await viewer.screenshot({ path: `${artifacts}/hosts-phone.png`, fullPage: true });

  // ---- the admin cordons and uncordons the host ----
  await admin.click(`${row} button[data-op=cordon]`);
  await stateIs(admin, 'Cordoned');
  check(true, 'cordon from the page: the host is Cordoned');
  await admin.screenshot({ path: `${artifacts}/hosts-cordoned.png`, fullPage: true });
  await admin.click(`${row} button[data-op=uncordon]`);
  await stateIs(admin, 'Ready');
  check(true, 'uncordon from the page: the host is Ready again');

  // ---- a drain with nowhere to go: Draining with its VM left, progress shown, then aborted ----
  await admin.click(`${row} button[data-op=drain]`);
  await stateIs(admin, 'Draining');
  await admin.waitForSelector(`${row} .vms-left[data-left="1"]`);
  await admin.waitForSelector(`${row} progress.drain`);
  check(true, 'drain from the page: the host is Draining with 1 VM left and a progress bar');
  await admin.screenshot({ path: `${artifacts}/hosts-draining.png`, fullPage: true });
  await admin.click(`${row} button[data-op=drain-abort]`);
  await stateIs(admin, 'Ready');
  await admin.waitForSelector(`${row} .vm[data-vm="${VM}"]`);
  check(await admin.locator(`${row} progress.drain`).count() === 0, 'drain aborted from the page: Ready, the VM still there, no progress bar');

  // Unknown hosts and actions are refused with a message naming them.
  const bad = await admin.evaluate(async () => {
    const a = await fetch('/api/hosts/no-such-host/cordon', { method: 'POST' });
    const b = await fetch('/api/hosts/x/reboot', { method: 'POST' });
    return [a.status, (await a.json()).message, b.status, (await b.json()).message];
  });
  check(bad[0] === 404 && bad[1].includes('no-such-host') && bad[2] === 404 && bad[3].includes('reboot'),
    `unknown hosts and actions are refused (${JSON.stringify(bad)})`);
  console.log('hosts browser test: all passed');
} catch (e) {
  for (const ctx of browser.contexts()) {
    for (const [i, p] of ctx.pages().entries()) {
      await p.screenshot({ path: `${artifacts}/hosts-failure-${i}.png`, fullPage: true }).catch(() => {});
      console.log(`page ${i} at ${p.url()}:\n${await p.textContent('body').catch(() => '?')}`);
    }
  }
  throw e;
} finally {
  await browser.close();
}
