// `ray web` over HTTPS and WSS, in Debian's chromium driven by playwright-core.
// Run by the e2e test `web::the_dashboard_works_over_https` (tests/e2e/web.rs), which
// starts `ray web --tls-cert --tls-key` with a self-signed certificate and passes:
//   RAY_WEB_URL        https://127.0.0.1:PORT
//   RAY_WEB_ADMIN      an admin token
//   RAY_WEB_ARTIFACTS  where the page screenshots go
// Login, a VM started from the page and listed live, and the noVNC console over wss://
// compared pixel for pixel with the screenshot API.
import { check, launch, need } from './common.mjs';

const url = need('RAY_WEB_URL');
const adminToken = need('RAY_WEB_ADMIN');
const artifacts = need('RAY_WEB_ARTIFACTS');
const VM = 'tlsvm';

check(url.startsWith('https://'), `the server is addressed over https (${url})`);

const browser = await launch(artifacts);

try {
  // The certificate is self-signed for this test: the browser is told to accept it.
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 720 }, ignoreHTTPSErrors: true });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
  page.on('console', (m) => console.log(`page console: ${m.text()}`));
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(ws.url()));

  await page.goto(url);
  await page.waitForSelector('#token');
  check(await page.evaluate(() => location.protocol === 'https:' && window.isSecureContext),
    'the login page is served over https (a secure context)');
  await page.fill('#token', adminToken);
  await page.click('button[type=submit]');
  await page.waitForSelector('#who:not(:empty)');
  check((await page.textContent('#who')).includes('(admin)'), 'logged in as admin over https');
  const cookies = await ctx.cookies();
  const session = cookies.find((c) => c.name === 'ray_web');
  check(session && session.secure && session.httpOnly, `the session cookie is Secure and HttpOnly (${JSON.stringify({ secure: session?.secure, httpOnly: session?.httpOnly })})`);

  await page.fill('#new-id', VM);
  await page.fill('#new-memory', '128M');
  await page.fill('#new-gpu', 'emulated,width=320,height=240');
  await page.click('#create');
  await page.waitForFunction((vm) => location.hash === `#/vm/${vm}`, VM, { timeout: 30000 });
  await page.waitForSelector('#summary [data-state=running]', { timeout: 20000 });
  check(true, 'a VM started from the page over https is running');

  await page.goto(`${url}/#/`);
  await page.waitForSelector(`#vms tr[data-vm=${VM}] [data-state=running]`, { timeout: 15000 });
  check(true, 'the VM list shows the VM running (live stream over https)');
  await page.screenshot({ path: `${artifacts}/https-vm-list.png`, fullPage: true });

  // The serial console (a WebSocket) makes the guest draw, so the display is not blank.
  await page.goto(`${url}/#/vm/${VM}/serial`);
  await page.waitForSelector('#serial-status[data-connected]', { timeout: 15000 });
  await page.waitForFunction(() => {
    const b = window.rayTerm?.buffer.active;
    if (!b) return false;
    for (let i = 0; i < b.length; i++) if (b.getLine(i).translateToString(true).includes('ready')) return true;
    return false;
  }, null, { timeout: 30000 });
  await page.click('#terminal');
  await page.keyboard.type('draw checker 5 0\r');
  await page.waitForFunction(() => {
    const b = window.rayTerm.buffer.active;
    for (let i = 0; i < b.length; i++) if (b.getLine(i).translateToString(true).includes('draw checker seed=5 display=0')) return true;
    return false;
  }, null, { timeout: 20000 });
  check(true, 'the serial console over wss reached the guest and showed its answer');

  await page.goto(`${url}/#/vm/${VM}/display/0`);
  await page.waitForSelector('#vnc-status[data-connected]', { timeout: 15000 });
  let last;
  for (let i = 0; i < 50; i++) {
    last = await page.evaluate(async (vm) => {
      const canvas = document.querySelector('#screen canvas');
      if (!canvas || !canvas.width) return { ok: false, why: 'no noVNC canvas' };
      const live = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
      const r = await fetch(`/api/vms/${vm}/display/0/screenshot.png`);
      if (!r.ok) return { ok: false, why: `screenshot HTTP ${r.status}` };
      const bmp = await createImageBitmap(await r.blob());
      if (bmp.width !== canvas.width || bmp.height !== canvas.height) return { ok: false, why: 'sizes differ' };
      const c = new OffscreenCanvas(bmp.width, bmp.height).getContext('2d');
      c.drawImage(bmp, 0, 0);
      const png = c.getImageData(0, 0, bmp.width, bmp.height).data;
      let differ = 0; const colours = new Set();
      for (let j = 0; j < png.length; j += 4) {
        if (live[j] !== png[j] || live[j + 1] !== png[j + 1] || live[j + 2] !== png[j + 2]) differ++;
        if (colours.size < 8) colours.add((png[j] << 16) | (png[j + 1] << 8) | png[j + 2]);
      }
      return { ok: differ === 0 && colours.size > 1, differ, colours: colours.size };
    }, VM);
    if (last.ok) break;
    await page.waitForTimeout(200);
  }
  check(last.ok, `the noVNC canvas over wss equals the PNG screenshot (${JSON.stringify(last)})`);
  check(sockets.some((s) => s.startsWith('wss://') && s.includes('/vnc/0')), `noVNC connected with wss:// (${sockets.join(', ')})`);
  check(sockets.every((s) => s.startsWith('wss://')), 'every WebSocket the page opened is wss://');
  await page.screenshot({ path: `${artifacts}/https-graphical-console.png`, fullPage: true });

  // ---- the low-bandwidth viewer: the display's H.264 stream decoded by WebCodecs ----
  // Lossy: the decoded picture is compared with the PNG screenshot within a tolerance.
  const h264Diff = () => page.evaluate(async (vm) => {
    const canvas = document.querySelector('#h264-canvas');
    if (!canvas || !canvas.width) return { ok: false, why: 'nothing decoded yet' };
    const live = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const bmp = await createImageBitmap(await (await fetch(`/api/vms/${vm}/display/0/screenshot.png`)).blob());
    if (bmp.width !== canvas.width || bmp.height !== canvas.height) {
      return { ok: false, why: `sizes differ: ${canvas.width}x${canvas.height} vs ${bmp.width}x${bmp.height}` };
    }
    const c = new OffscreenCanvas(bmp.width, bmp.height).getContext('2d');
    c.drawImage(bmp, 0, 0);
    const png = c.getImageData(0, 0, bmp.width, bmp.height).data;
    let sum = 0;
    for (let j = 0; j < png.length; j += 4) {
      sum += Math.abs(live[j] - png[j]) + Math.abs(live[j + 1] - png[j + 1]) + Math.abs(live[j + 2] - png[j + 2]);
    }
    const mean = sum / (png.length / 4 * 3);
    return { ok: mean < 12, mean: Math.round(mean * 100) / 100 };
  }, VM);
  const waitH264 = async (what) => {
    let last;
    for (let i = 0; i < 100; i++) {
      last = await h264Diff();
      if (last.ok) break;
      await page.waitForTimeout(200);
    }
    check(last.ok, `${what}: the decoded H.264 picture matches the PNG screenshot (mean difference ${JSON.stringify(last)})`);
  };
  await page.goto(`${url}/#/vm/${VM}/h264/0`);
  await page.waitForSelector('#h264-status[data-frames]', { timeout: 20000 });
  await waitH264('low-bandwidth viewer');
  await page.screenshot({ path: `${artifacts}/h264-viewer.png`, fullPage: true });
  const fingerprint = () => page.evaluate(async (vm) => {
    const bmp = await createImageBitmap(await (await fetch(`/api/vms/${vm}/display/0/screenshot.png`)).blob());
    const c = new OffscreenCanvas(bmp.width, bmp.height).getContext('2d');
    c.drawImage(bmp, 0, 0);
    const d = c.getImageData(0, 0, bmp.width, bmp.height).data;
    let h = 0;
    for (let j = 0; j < d.length; j += 4) h = (h * 31 + d[j] + 7 * d[j + 1] + 13 * d[j + 2]) >>> 0;
    return h;
  }, VM);
  const before = await fingerprint();
  const typed = await page.evaluate(async (vm) => (await fetch(`/api/vms/${vm}/console`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ data: 'draw gradient 9 0\r' }),
  })).status, VM);
  check(typed >= 200 && typed < 300, `the guest is asked to draw a new pattern (HTTP ${typed})`);
  // Wait for the display itself to change, then for the decoded picture to follow it.
  for (let i = 0; i < 100 && (await fingerprint()) === before; i++) await page.waitForTimeout(200);
  check((await fingerprint()) !== before, 'the display changed');
  await waitH264('after the guest drew a new pattern');
  check(sockets.some((s) => s.startsWith('wss://') && s.includes('/h264/0')), 'the H.264 stream came over wss://');

  // Started without the cluster store, the hosts page says so (the API answers 404 no_cluster).
  const hosts = await page.evaluate(async () => { const r = await fetch('/api/hosts'); return { status: r.status, body: await r.json() }; });
  check(hosts.status === 404 && hosts.body.code === 'no_cluster' && hosts.body.message.includes('--cluster'),
    `without --cluster the hosts API says so (${JSON.stringify(hosts)})`);
  await page.click('#nav-hosts');
  await page.waitForFunction(() => document.querySelector('#hosts-status')?.textContent.includes('--cluster'));
  check(true, 'the hosts page says ray web was started without the cluster store');

  const stopped = await page.evaluate(async (vm) => (await fetch(`/api/vms/${vm}/stop`, { method: 'POST' })).status, VM);
  check(stopped === 200, 'an admin stops the VM over https');
  console.log('tls browser test: all passed');
} catch (e) {
  for (const ctx of browser.contexts()) {
    for (const [i, p] of ctx.pages().entries()) {
      await p.screenshot({ path: `${artifacts}/https-failure-${i}.png`, fullPage: true }).catch(() => {});
      console.log(`page ${i} at ${p.url()}:\n${await p.textContent('body').catch(() => '?')}`);
    }
  }
  throw e;
} finally {
  await browser.close();
}
