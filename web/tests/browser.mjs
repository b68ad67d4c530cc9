// The browser test of `ray web`, in Debian's chromium driven by playwright-core.
// Run by the e2e test `web::` (tests/e2e/web.rs), which starts `ray web` and passes:
//   RAY_WEB_URL        http://127.0.0.1:PORT
//   RAY_WEB_ADMIN      an admin token;  RAY_WEB_VIEWER  a viewer token
//   RAY_WEB_ARTIFACTS  where the page screenshots go
// Every step asserts what it sees; any failure throws and the process exits non-zero.
import { check, launch, need, termText, waitTerm } from './common.mjs';

const url = need('RAY_WEB_URL');
const adminToken = need('RAY_WEB_ADMIN');
const viewerToken = need('RAY_WEB_VIEWER');
const artifacts = need('RAY_WEB_ARTIFACTS');
const VM = 'webvm';


const browser = await launch(artifacts);

async function shot(page, name) {
  await page.screenshot({ path: `${artifacts}/${name}.png`, fullPage: true });
}

async function login(page, token) {
  await page.goto(url);
  await page.waitForSelector('#token');
  await page.fill('#token', token);
  await page.click('button[type=submit]');
  await page.waitForSelector('#who:not(:empty)');
}

// The noVNC canvas and the PNG screenshot of the same display, pixel for pixel.
async function compareWithScreenshot(page, display) {
  return page.evaluate(async ({ vm, display }) => {
    const canvas = document.querySelector('#screen canvas');
    if (!canvas || !canvas.width) return { ok: false, why: 'no noVNC canvas' };
    const live = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const r = await fetch(`/api/vms/${vm}/display/${display}/screenshot.png`);
    if (!r.ok) return { ok: false, why: `screenshot HTTP ${r.status}` };
    const bmp = await createImageBitmap(await r.blob());
    if (bmp.width !== canvas.width || bmp.height !== canvas.height) {
      return { ok: false, why: `sizes differ: canvas ${canvas.width}x${canvas.height}, PNG ${bmp.width}x${bmp.height}` };
    }
    const off = new OffscreenCanvas(bmp.width, bmp.height);
    const ctx = off.getContext('2d');
    ctx.drawImage(bmp, 0, 0);
    const png = ctx.getImageData(0, 0, bmp.width, bmp.height).data;
    let differ = 0, first = -1, distinct = new Set();
    for (let i = 0; i < png.length; i += 4) {
      if (live[i] !== png[i] || live[i + 1] !== png[i + 1] || live[i + 2] !== png[i + 2]) {
        differ++; if (first < 0) first = i / 4;
      }
      if (distinct.size < 8) distinct.add((png[i] << 16) | (png[i + 1] << 8) | png[i + 2]);
    }
    return { ok: differ === 0, differ, first, colours: distinct.size, width: bmp.width, height: bmp.height };
  }, { vm: VM, display });
}

async function waitMatch(page, display, what) {
  let last;
  for (let i = 0; i < 50; i++) {
    last = await compareWithScreenshot(page, display);
    if (last.ok) break;
    await page.waitForTimeout(200);
  }
  check(last.ok && last.colours > 1, `${what}: noVNC canvas equals the PNG screenshot (${JSON.stringify(last)})`);
}


async function noOverflow(page, width, what) {
  const w = await page.evaluate(() => document.documentElement.scrollWidth);
  check(w <= width, `${what}: no horizontal overflow at ${width}px (content ${w}px)`);
}

try {
  // ---- an admin logs in (1280x720) and starts a VM with a display ----
  const admin = await browser.newContext({ viewport: { width: 1280, height: 720 } });
  const page = await admin.newPage();
  page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
  page.on('console', (m) => console.log(`page console: ${m.text()}`));
  await page.goto(url);
  await page.waitForSelector('#token');
  await shot(page, 'login');
  await page.fill('#token', 'not-a-token-at-all');
  await page.click('button[type=submit]');
  await page.waitForSelector('#login-error:not(:empty)');
  check((await page.textContent('#login-error')).includes('not in ray web'), 'a wrong token is refused with a message');
  await login(page, adminToken);
  check((await page.textContent('#who')).includes('(admin)'), 'logged in as admin');
  await page.fill('#new-id', VM);
  await page.fill('#new-memory', '128M');
  await page.fill('#new-gpu', 'emulated,width=640,height=480');
  await page.click('#create');
  await page.waitForFunction((vm) => location.hash === `#/vm/${vm}`, VM, { timeout: 30000 });
  await page.waitForSelector('#summary [data-state=running]', { timeout: 20000 });
  check(true, 'the VM started from the page is running');

  // The list shows it live (server-sent events).
  await page.goto(`${url}/#/`);
  await page.waitForSelector(`#vms tr[data-vm=${VM}] [data-state=running]`);
  check(true, 'the VM list shows the VM running (live stream)');
  await shot(page, 'vm-list');
  await noOverflow(page, 1280, 'VM list');

  // ---- serial console: history on open, typing reaches the guest ----
  await page.goto(`${url}/#/vm/${VM}/serial`);
  await page.waitForSelector('#serial-status[data-connected]');
  await waitTerm(page, 'ready');
  check(true, 'the serial console shows the boot history (the guest\'s "ready")');
  await page.click('#terminal');
  await page.keyboard.type('draw checker 7 0\r');
  await waitTerm(page, 'draw checker seed=7 display=0 640x480');
  check(true, 'typed into the serial console, the guest answered');
  await shot(page, 'serial-console');
  // A second console opened later sees the exchange in its history.
  const late = await admin.newPage();
  await late.goto(`${url}/#/vm/${VM}/serial`);
  await late.waitForSelector('#serial-status[data-connected]');
  await waitTerm(late, 'draw checker seed=7 display=0 640x480');
  check(true, 'a console opened later shows the earlier output as history');
  await late.close();

  // ---- graphical console: noVNC pixels equal the screenshot API's PNG ----
  await page.goto(`${url}/#/vm/${VM}/display/0`);
  await page.waitForSelector('#vnc-status[data-connected]', { timeout: 15000 });
  await waitMatch(page, 0, 'admin (read-write VNC)');
  await shot(page, 'graphical-console');
  // The picture changes: the canvas follows.
  const typer = await admin.newPage();
  await typer.goto(`${url}/#/vm/${VM}/serial`);
  await typer.waitForSelector('#serial-status[data-connected]');
  await typer.click('#terminal');
  await typer.keyboard.type('draw gradient 3 0\r');
  await waitTerm(typer, 'draw gradient seed=3 display=0 640x480');
  await typer.close();
  await waitMatch(page, 0, 'after the guest drew a new pattern');

  // ---- a viewer: view-only VNC at the same time, and no power to stop ----
  const viewerCtx = await browser.newContext({ viewport: { width: 390, height: 844 } });
  const viewer = await viewerCtx.newPage();
  await viewer.goto(url);
  await viewer.waitForSelector('#token');
  // Keyboard only: Tab to the token field, type, Enter.
  for (let i = 0; i < 6 && !(await viewer.evaluate(() => document.activeElement?.id === 'token')); i++) await viewer.keyboard.press('Tab');
  check(await viewer.evaluate(() => document.activeElement?.id === 'token'), 'the token field is reached with Tab');
  await viewer.keyboard.type(viewerToken);
  await viewer.keyboard.press('Enter');
  await viewer.waitForSelector('#who:not(:empty)');
  check((await viewer.textContent('#who')).includes('(viewer)'), 'logged in as viewer with the keyboard only');
  await viewer.waitForSelector(`#vms tr[data-vm=${VM}]`);
  await noOverflow(viewer, 390, 'VM list on a phone');
  await shot(viewer, 'vm-list-phone');
  const stop = await viewer.evaluate(async (vm) => {
    const r = await fetch(`/api/vms/${vm}/stop`, { method: 'POST' });
    return { status: r.status, body: await r.json() };
  }, VM);
  check(stop.status === 403 && stop.body.code === 'forbidden' && stop.body.message.includes('operator'),
    `the server refuses a viewer's stop with 403 (${JSON.stringify(stop)})`);
  // Every action endpoint refuses a viewer on the server, before acting.
  const refusals = await viewer.evaluate(async (vm) => {
    const post = async (path, body) => (await fetch(path, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body ?? {}),
    })).status;
    return {
      start: await post(`/api/vms/${vm}/start`), pause: await post(`/api/vms/${vm}/pause`),
      resume: await post(`/api/vms/${vm}/resume`), snapshot: await post(`/api/vms/${vm}/snapshots`, { name: 'v' }),
      restore: await post(`/api/vms/${vm}/restore`, { name: 'v' }), migrate: await post(`/api/vms/${vm}/migration`),
      cancel: await post(`/api/vms/${vm}/migration/cancel`), console: await post(`/api/vms/${vm}/console`, { data: 'x' }),
      create: await post('/api/vms', { id: 'nope' }),
    };
  }, VM);
  check(Object.values(refusals).every((s) => s === 403), `every action answers 403 to a viewer (${JSON.stringify(refusals)})`);
  await viewer.goto(`${url}/#/vm/${VM}`);
  await viewer.waitForSelector('#summary [data-state=running]');
  check(await viewer.isDisabled('#do-stop'), 'the stop button is disabled for a viewer too');
  await noOverflow(viewer, 390, 'VM detail on a phone');
  await shot(viewer, 'vm-detail-phone');
  await viewer.goto(`${url}/#/vm/${VM}/display/0`);
  await viewer.waitForSelector('#vnc-status[data-connected]', { timeout: 15000 });
  await waitMatch(viewer, 0, 'viewer (view-only VNC) while the admin is connected');
  await waitMatch(page, 0, 'admin still connected beside the viewer');

  // ---- snapshot from the page ----
  await page.goto(`${url}/#/vm/${VM}`);
  await page.waitForSelector('#summary [data-state=running]');
  await page.fill('#snapshot-name', 'first');
  await page.click('#do-snapshot');
  await page.waitForFunction(() => document.querySelector('#snapshot-text')?.textContent.includes('snapshot first written'), null, { timeout: 30000 });
  await page.waitForSelector('#snapshot-pick option[value=first]', { state: 'attached', timeout: 10000 });
  check(true, 'a snapshot taken from the page is listed');
  // ---- restore that snapshot as a new VM: it shows the same picture ----
  await page.click('#do-restore');
  await page.waitForFunction((vm) => location.hash.startsWith('#/vm/') && location.hash !== `#/vm/${vm}`, VM, { timeout: 30000 });
  await page.waitForSelector('#summary [data-state=running]', { timeout: 20000 });
  const restored = decodeURIComponent(page.url().split('#/vm/')[1]);
  const same = await page.evaluate(async ([a, b]) => {
    const px = async (vm) => {
      const bmp = await createImageBitmap(await (await fetch(`/api/vms/${vm}/display/0/screenshot.png`)).blob());
      const c = new OffscreenCanvas(bmp.width, bmp.height).getContext('2d');
      c.drawImage(bmp, 0, 0);
      return c.getImageData(0, 0, bmp.width, bmp.height).data;
    };
    const [x, y] = [await px(a), await px(b)];
    return x.length === y.length && x.every((v, i) => v === y[i]);
  }, [VM, restored]);
  check(same, `the snapshot restored from the page runs as ${restored} and shows the same display`);
  const stopRestored = await page.evaluate(async (t) => (await fetch(`/api/vms/${t}/stop`, { method: 'POST' })).status, restored);
  check(stopRestored === 200, 'an admin stops the restored VM');
  await page.goto(`${url}/#/vm/${VM}`);
  await page.waitForSelector('#summary [data-state=running]');
  await page.waitForSelector('#thumbs img');
  await page.waitForFunction(() => [...document.querySelectorAll('#thumbs img')].every((i) => i.complete && i.naturalWidth === 640), null, { timeout: 10000 });
  check(true, 'the detail page shows the display thumbnail from the screenshot API');
  await shot(page, 'vm-detail');
  await noOverflow(page, 1280, 'VM detail');

  // ---- live migration on this host, followed by the progress bar ----
  await page.click('#do-migrate');
  await page.waitForFunction(() => document.querySelector('#migration-progress')?.dataset.state === 'completed'
    && document.querySelector('#migration-progress').value === 100, null, { timeout: 60000 });
  check(true, 'the migration progress bar reached 100 % (completed)');
  const target = await page.textContent('#migration-target');
  await shot(page, 'migration-done');
  await page.click('#migration-target');
  await page.waitForSelector('#summary [data-state=running]', { timeout: 15000 });
  check(true, `the migrated VM ${target} runs`);
  await page.goto(`${url}/#/vm/${target}/display/0`);
  await page.waitForSelector('#vnc-status[data-connected]', { timeout: 15000 });
  const after = await page.evaluate(async (t) => {
    const r = await fetch(`/api/vms/${t}/display/0/screenshot.png`);
    return r.status;
  }, target);
  check(after === 200, 'the migrated VM\'s display answers');

  // Clean up: stop the migrated VM as admin.
  const stopped = await page.evaluate(async (t) => (await fetch(`/api/vms/${t}/stop`, { method: 'POST' })).status, target);
  check(stopped === 200, 'an admin stops the VM');
  console.log('browser test: all passed');
} catch (e) {
  // Leave the state of every open page for the person reading the failure.
  for (const ctx of browser.contexts()) {
    for (const [i, p] of ctx.pages().entries()) {
      await p.screenshot({ path: `${artifacts}/failure-${i}.png`, fullPage: true }).catch(() => {});
      console.log(`page ${i} at ${p.url()}:\n${await p.textContent('body').catch(() => '?')}`);
    }
  }
  throw e;
} finally {
  await browser.close();
}
