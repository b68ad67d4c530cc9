// The browser test of resolution following the window: a read-write noVNC console of a
// virtio-gpu display asks the VM for the size of its box (ExtendedDesktopSize), the
// display takes it (the screenshot API reports it), the guest gets the display event and
// what it draws at the new size reaches the canvas; another window size, another size.
// Run by the e2e test `web::the_console_resolution_follows_the_browser_window`
// (tests/e2e/web.rs), which starts `ray web` and passes:
//   RAY_WEB_URL        http://127.0.0.1:PORT
//   RAY_WEB_ADMIN      an admin token
//   RAY_WEB_ARTIFACTS  where the page screenshots go
// Every step asserts what it sees; any failure throws and the process exits non-zero.
import { check, launch, need, termText, waitTerm } from './common.mjs';

const url = need('RAY_WEB_URL');
const adminToken = need('RAY_WEB_ADMIN');
const artifacts = need('RAY_WEB_ARTIFACTS');
const VM = 'resizevm';


const browser = await launch(artifacts);

// The console's box, its noVNC canvas and the screenshot API's PNG of the display: sizes,
// and whether the canvas shows the PNG's pixels.
async function sizes(page) {
  return page.evaluate(async (vm) => {
    const box = document.querySelector('#screen');
    const canvas = document.querySelector('#screen canvas');
    const r = await fetch(`/api/vms/${vm}/display/0/screenshot.png`);
    if (!box || !canvas || !r.ok) return { ready: false };
    const bmp = await createImageBitmap(await r.blob());
    const out = {
      ready: true, box: [box.clientWidth, box.clientHeight], canvas: [canvas.width, canvas.height],
      png: [bmp.width, bmp.height], same: false, colours: 0,
    };
    if (bmp.width !== canvas.width || bmp.height !== canvas.height) return out;
    const live = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const c = new OffscreenCanvas(bmp.width, bmp.height).getContext('2d');
    c.drawImage(bmp, 0, 0);
    const png = c.getImageData(0, 0, bmp.width, bmp.height).data;
    let differ = 0;
    const distinct = new Set();
    for (let i = 0; i < png.length; i += 4) {
      if (live[i] !== png[i] || live[i + 1] !== png[i + 1] || live[i + 2] !== png[i + 2]) differ++;
      if (distinct.size < 8) distinct.add((png[i] << 16) | (png[i + 1] << 8) | png[i + 2]);
    }
    return { ...out, same: differ === 0, colours: distinct.size };
  }, VM);
}

// Waits until the display has the console box's size and differs from `before`.
async function waitFollow(page, before, what) {
  let last;
  for (let i = 0; i < 150; i++) {
    last = await sizes(page);
    if (last.ready && (last.png[0] !== before[0] || last.png[1] !== before[1])
      && last.png[0] === last.canvas[0] && last.png[1] === last.canvas[1]
      && last.canvas[0] === last.box[0] && last.canvas[1] === last.box[1]) break;
    await page.waitForTimeout(200);
  }
  check(last.ready && last.png[0] === last.box[0] && last.png[1] === last.box[1]
    && (last.png[0] !== before[0] || last.png[1] !== before[1]),
  `${what}: the display took the console's size (${JSON.stringify(last)})`);
  return last.png;
}


// The guest saw the display event for `size` and draws `pattern` at that size; the
// console's canvas then equals the screenshot, pattern and all.
async function guestRedraws(page, term, size, pattern, seed, what) {
  await waitTerm(term, `gpu display event: scanout 0 is ${size[0]}x${size[1]}`);
  check(true, `${what}: the guest got the display event for ${size[0]}x${size[1]}`);
  await term.click('#terminal');
  await term.keyboard.type(`draw ${pattern} ${seed} 0\r`);
  await waitTerm(term, `draw ${pattern} seed=${seed} display=0 ${size[0]}x${size[1]}`);
  let last;
  for (let i = 0; i < 50; i++) {
    last = await sizes(page);
    if (last.same && last.colours > 1) break;
    await page.waitForTimeout(200);
  }
  check(last.same && last.colours > 1, `${what}: the canvas shows what the guest drew at the new size (${JSON.stringify(last)})`);
}

try {
  const ctx = await browser.newContext({ viewport: { width: 1024, height: 640 } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
  page.on('console', (m) => console.log(`page console: ${m.text()}`));
  await page.goto(url);
  await page.waitForSelector('#token');
  await page.fill('#token', adminToken);
  await page.click('button[type=submit]');
  await page.waitForSelector('#who:not(:empty)');
  await page.fill('#new-id', VM);
  await page.fill('#new-memory', '128M');
  await page.fill('#new-gpu', 'virtio,width=640,height=480');
  await page.click('#create');
  await page.waitForFunction((vm) => location.hash === `#/vm/${vm}`, VM, { timeout: 30000 });
  await page.waitForSelector('#summary [data-state=running]', { timeout: 20000 });
  check(true, 'a VM with a virtio GPU started from the page');

  // The guest's virtio-gpu driver starts with its first drawing.
  const term = await ctx.newPage();
  await term.goto(`${url}/#/vm/${VM}/serial`);
  await term.waitForSelector('#serial-status[data-connected]');
  await waitTerm(term, 'ready');
  await term.click('#terminal');
  await term.keyboard.type('draw gradient 3 0\r');
  await waitTerm(term, 'draw gradient seed=3 display=0 640x480');

  // ---- 1024x640: the display takes the console box's size ----
  await page.goto(`${url}/#/vm/${VM}/display/0`);
  await page.waitForSelector('#vnc-status[data-connected]', { timeout: 15000 });
  await page.waitForSelector('#screen[data-follow]', { timeout: 15000 });
  const first = await waitFollow(page, [640, 480], 'window 1024x640');
  check(first[0] % 8 === 0 && first[0] > 640 && first[0] <= 1024 && first[1] > 200 && first[1] < 640,
    `window 1024x640: the display is ${first[0]}x${first[1]} (the window less the page around the console)`);
  await guestRedraws(page, term, first, 'checker', 5, 'window 1024x640');
  await page.screenshot({ path: `${artifacts}/console-follows-1024x640.png` });

  // ---- 1280x720: again ----
  await page.setViewportSize({ width: 1280, height: 720 });
  const second = await waitFollow(page, first, 'window 1280x720');
  check(second[0] > first[0] && second[1] > first[1], `window 1280x720: the display grew to ${second[0]}x${second[1]}`);
  await guestRedraws(page, term, second, 'bars', 2, 'window 1280x720');
  await page.screenshot({ path: `${artifacts}/console-follows-1280x720.png` });

  const stopped = await page.evaluate(async (vm) => (await fetch(`/api/vms/${vm}/stop`, { method: 'POST' })).status, VM);
  check(stopped === 200, 'an admin stops the VM');
  console.log('resize test: all passed');
} catch (e) {
  for (const ctx of browser.contexts()) {
    for (const [i, p] of ctx.pages().entries()) {
      await p.screenshot({ path: `${artifacts}/resize-failure-${i}.png`, fullPage: true }).catch(() => {});
      console.log(`page ${i} at ${p.url()}:\n${await p.textContent('body').catch(() => '?')}`);
    }
  }
  throw e;
} finally {
  await browser.close();
}
