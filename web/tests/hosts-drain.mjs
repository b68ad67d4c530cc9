// A full drain from the hosts page: two agents on the single-host store, a cluster VM on
// one of them; the admin drains that host from the page and follows it to Drained while
// the controller live-migrates the VM to the other host, then uncordons it back to Ready.
// Run by the e2e test `web::the_hosts_page_drains_...` (tests/e2e/web.rs), which passes:
//   RAY_WEB_URL, RAY_WEB_ADMIN, RAY_WEB_ARTIFACTS (as browser.mjs)
//   RAY_WEB_FROM, RAY_WEB_TO  the host the VM runs on and the other;  RAY_WEB_CLUSTER_VM  the VM
import { check, launch, need } from './common.mjs';

const url = need('RAY_WEB_URL');
const adminToken = need('RAY_WEB_ADMIN');
const artifacts = need('RAY_WEB_ARTIFACTS');
const FROM = need('RAY_WEB_FROM');
const TO = need('RAY_WEB_TO');
const VM = need('RAY_WEB_CLUSTER_VM');


const browser = await launch(artifacts);

const row = (h) => `#hosts tr[data-host="${h}"]`;

try {
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 720 } })).newPage();
  page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
  await page.goto(url);
  await page.waitForSelector('#token');
  await page.fill('#token', adminToken);
  await page.click('button[type=submit]');
  await page.waitForSelector('#who:not(:empty)');
  await page.goto(`${url}/#/hosts`);
  await page.waitForSelector(`${row(FROM)} [data-state="Ready"]`, { timeout: 30000 });
  await page.waitForSelector(`${row(TO)} [data-state="Ready"]`, { timeout: 30000 });
  await page.waitForSelector(`${row(FROM)} .vm[data-vm="${VM}"]`, { timeout: 30000 });
  check(true, `both hosts Ready, ${VM} on ${FROM}`);

  await page.click(`${row(FROM)} button[data-op=drain]`);
  await page.waitForSelector(`${row(FROM)} progress.drain`, { timeout: 30000 });
  check(true, `drain of ${FROM} started from the page: a progress bar`);
  await page.waitForSelector(`${row(FROM)} [data-state="Drained"]`, { timeout: 120000 });
  await page.waitForSelector(`${row(FROM)} .vms-left[data-left="0"]`);
  const value = await page.getAttribute(`${row(FROM)} progress.drain`, 'value');
  check(value === '100', `${FROM} is Drained, 0 VMs left, the progress bar at 100 (${value})`);
  await page.waitForSelector(`${row(TO)} .vm[data-vm="${VM}"]`, { timeout: 30000 });
  check(true, `${VM} now runs on ${TO}`);
  await page.screenshot({ path: `${artifacts}/hosts-drained.png`, fullPage: true });

  await page.click(`${row(FROM)} button[data-op=uncordon]`);
  await page.waitForSelector(`${row(FROM)} [data-state="Ready"]`, { timeout: 60000 });
  check(true, `uncordon from the page: ${FROM} is back to Ready`);
  console.log('hosts drain browser test: all passed');
} catch (e) {
  for (const ctx of browser.contexts()) {
    for (const [i, p] of ctx.pages().entries()) {
      await p.screenshot({ path: `${artifacts}/hosts-drain-failure-${i}.png`, fullPage: true }).catch(() => {});
      console.log(`page ${i} at ${p.url()}:\n${await p.textContent('body').catch(() => '?')}`);
    }
  }
  throw e;
} finally {
  await browser.close();
}
