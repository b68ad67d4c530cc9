// The browser test of the VNC server's encodings with noVNC: the console of an emulated
// display, whose viewer (noVNC) asks for CopyRect, then Tight, ...; the guest draws
// patterns of many colours, few colours, one colour, and scrolls; after each the noVNC
// canvas equals the screenshot API's PNG pixel for pixel (Tight is sent lossless).
// A second console then sets noVNC's quality level to 2, which lets the server send it
// Open H.264 (lossy): its canvas stays within a mean difference of 12/255 of the PNG.
// Run by the e2e test `web::novnc_gets_tight_and_copyrect_pixel_exact_and_h264_at_low_quality` (tests/e2e/web.rs),
// which starts `ray web`, passes the settings below and then reads the VMM's log for the
// encodings the viewer was sent.
//   RAY_WEB_URL        http://127.0.0.1:PORT
//   RAY_WEB_ADMIN      an admin token
//   RAY_WEB_ARTIFACTS  where the page screenshots go
import { check, launch, need, termText, waitTerm } from './common.mjs';

const url = need('RAY_WEB_URL');
const adminToken = need('RAY_WEB_ADMIN');
const artifacts = need('RAY_WEB_ARTIFACTS');
const VM = 'encvm';

const browser = await launch(artifacts);

// The noVNC canvas and the PNG screenshot of display 0, pixel for pixel.
async function compare(page) {
  return page.evaluate(async (vm) => {
    const canvas = document.querySelector('#screen canvas');
    if (!canvas || !canvas.width) return { ok: false, why: 'no noVNC canvas' };
    const live = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const r = await fetch(`/api/vms/${vm}/display/0/screenshot.png`);
    if (!r.ok) return { ok: false, why: `screenshot HTTP ${r.status}` };
    const bmp = await createImageBitmap(await r.blob());
    if (bmp.width !== canvas.width || bmp.height !== canvas.height) {
      return { ok: false, why: `sizes differ: canvas ${canvas.width}x${canvas.height}, PNG ${bmp.width}x${bmp.height}` };
    }
    const c = new OffscreenCanvas(bmp.width, bmp.height).getContext('2d');
    c.drawImage(bmp, 0, 0);
    const png = c.getImageData(0, 0, bmp.width, bmp.height).data;
    let differ = 0, first = -1;
    for (let i = 0; i < png.length; i += 4) {
      if (live[i] !== png[i] || live[i + 1] !== png[i + 1] || live[i + 2] !== png[i + 2]) {
        differ++; if (first < 0) first = i / 4;
      }
    }
    return { ok: differ === 0, differ, first };
  }, VM);
}

// The mean absolute difference (0-255, over R, G, B) of the noVNC canvas and the PNG.
async function meanDiff(page) {
  return page.evaluate(async (vm) => {
    const canvas = document.querySelector('#screen canvas');
    if (!canvas || !canvas.width) return { diff: 255, why: 'no noVNC canvas' };
    const live = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const bmp = await createImageBitmap(await (await fetch(`/api/vms/${vm}/display/0/screenshot.png`)).blob());
    if (bmp.width !== canvas.width || bmp.height !== canvas.height) return { diff: 255, why: 'sizes differ' };
    const c = new OffscreenCanvas(bmp.width, bmp.height).getContext('2d');
    c.drawImage(bmp, 0, 0);
    const png = c.getImageData(0, 0, bmp.width, bmp.height).data;
    let sum = 0;
    for (let i = 0; i < png.length; i += 4) {
      sum += Math.abs(live[i] - png[i]) + Math.abs(live[i + 1] - png[i + 1]) + Math.abs(live[i + 2] - png[i + 2]);
    }
    return { diff: sum / (png.length / 4 * 3) };
  }, VM);
}

async function waitMatch(page, what) {
  let last;
  for (let i = 0; i < 100; i++) {
    last = await compare(page);
    if (last.ok) break;
    await page.waitForTimeout(200);
  }
  check(last.ok, `${what}: the noVNC canvas equals the PNG screenshot (${JSON.stringify(last)})`);
}


try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 720 } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
  await page.goto(url);
  await page.waitForSelector('#token');
  await page.fill('#token', adminToken);
  await page.click('button[type=submit]');
  await page.waitForSelector('#who:not(:empty)');
  await page.fill('#new-id', VM);
  await page.fill('#new-memory', '128M');
  await page.fill('#new-gpu', 'emulated,width=640,height=480');
  await page.click('#create');
  await page.waitForFunction((vm) => location.hash === `#/vm/${vm}`, VM, { timeout: 30000 });
  await page.waitForSelector('#summary [data-state=running]', { timeout: 20000 });
  // The serial console in a second page types the guest's commands.
  const serial = await ctx.newPage();
  await serial.goto(`${url}/#/vm/${VM}/serial`);
  await serial.waitForSelector('#serial-status[data-connected]');
  await waitTerm(serial, 'ready');
  await serial.click('#terminal');
  await serial.keyboard.type('draw gradient 5 0\r');
  await waitTerm(serial, 'draw gradient seed=5 display=0 640x480');
  await page.goto(`${url}/#/vm/${VM}/display/0`);
  await page.waitForSelector('#vnc-status[data-connected]', { timeout: 15000 });
  await waitMatch(page, 'a gradient (Tight pixels through zlib)');
  // Each command, then the picture it leaves.
  const steps = [
    ['scroll 16 0', 'scroll 16 display=0 640x480', 'scrolled by 16 lines (CopyRect)'],
    ['draw checker 3 0', 'draw checker seed=3 display=0', 'a checker board (Tight palettes and fills)'],
    ['scroll 50 0', 'scroll 50 display=0 640x480', 'the checker board scrolled by 50 lines'],
    ['draw fill 0x336699 0', 'draw fill seed=3368601 display=0', 'one colour (Tight fills)'],
    ['draw bars 0 0', 'draw bars seed=0 display=0', 'colour bars'],
    ['scroll 100 0', 'scroll 100 display=0 640x480', 'the bars scrolled by 100 lines'],
  ];
  for (const [command, answer, what] of steps) {
    await serial.keyboard.type(`${command}\r`);
    await waitTerm(serial, answer);
    await waitMatch(page, what);
  }
  await page.screenshot({ path: `${artifacts}/encodings-console.png`, fullPage: true });

  // ---- a second console at quality level 2: Open H.264, decoded with WebCodecs ----
  const lossy = await ctx.newPage();
  lossy.on('pageerror', (e) => console.log(`page error: ${e.message}`));
  lossy.on('console', (m) => console.log(`h264 page console: ${m.text()}`));
  await lossy.goto(`${url}/#/vm/${VM}/display/0`);
  await lossy.waitForSelector('#vnc-status[data-connected]', { timeout: 15000 });
  await lossy.evaluate(() => { window.rayRfb.qualityLevel = 2; });
  await serial.keyboard.type('draw gradient 7 0\r');
  await waitTerm(serial, 'draw gradient seed=7 display=0 640x480');
  let last;
  for (let i = 0; i < 100; i++) {
    last = await meanDiff(lossy);
    if (last.diff <= 12) break;
    await lossy.waitForTimeout(200);
  }
  check(last.diff <= 12, `the H.264 console shows the gradient within a mean difference of 12/255 (${JSON.stringify(last)})`);
  await waitMatch(page, 'the Tight console beside it, still pixel for pixel');
  await lossy.screenshot({ path: `${artifacts}/encodings-h264-console.png`, fullPage: true });
  console.log('encodings test: all passed');
} catch (e) {
  for (const ctx of browser.contexts()) {
    for (const [i, p] of ctx.pages().entries()) {
      await p.screenshot({ path: `${artifacts}/encodings-failure-${i}.png`, fullPage: true }).catch(() => {});
      console.log(`page ${i} at ${p.url()}:\n${await p.textContent('body').catch(() => '?')}`);
    }
  }
  throw e;
} finally {
  await browser.close();
}
