// ray web: the dashboard. Every action goes to ray web's /api, which checks the role and
// relays to the VM's own API; the page only shows what those answer.
import RFB from '/vendor/novnc/core/rfb.js';

const main = document.getElementById('main');
let me = null;          // {name, role}
let cleanup = [];       // what the current view must stop when it is left
const rank = { viewer: 0, operator: 1, admin: 2 };
const may = (role) => me && rank[me.role] >= rank[role];

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v === true) e.setAttribute(k, '');
    else if (v !== false && v != null) e.setAttribute(k, v);
  }
  for (const k of kids.flat()) if (k != null) e.append(k.nodeType ? k : String(k));
  return e;
}

function toast(text) {
  const t = document.getElementById('toast');
  t.textContent = text;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.textContent = ''; }, 6000);
}

async function api(method, path, body) {
  const r = await fetch('/api' + path, {
    method,
    headers: body !== undefined ? { 'content-type': 'application/json' } : {},
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const type = r.headers.get('content-type') || '';
  const data = type.includes('json') ? await r.json() : await r.text();
  if (!r.ok) {
    if (r.status === 401 && path !== '/me' && path !== '/login') { me = null; route(); }
    const e = new Error((data && data.message) || `${method} ${path}: HTTP ${r.status}`);
    e.status = r.status;
    throw e;
  }
  return data;
}

// One action button: runs, then says how it went.
function action(label, role, run, attrs = {}) {
  const b = el('button', { type: 'button', ...attrs }, label);
  if (!may(role)) { b.disabled = true; b.title = `needs the ${role} role`; }
  b.addEventListener('click', async () => {
    b.disabled = true;
    try { await run(); toast(`${label}: done`); }
    catch (e) { toast(`${label}: ${e.message}`); }
    finally { b.disabled = !may(role); }
  });
  return b;
}

const state = (s) => el('span', { class: `state ${s}`, 'data-state': s }, s);
const mib = (b) => b == null ? '–' : `${Math.round(b / 1048576)} MiB`;
const secs = (ms) => ms == null ? '–' : `${Math.round(ms / 1000)} s`;

function show(title, ...body) {
  document.title = `${title} – rayvisor`;
  main.replaceChildren(el('h1', {}, title), ...body);
  main.focus();
}

// ---- login ----
function loginView(message) {
  const input = el('input', { type: 'password', id: 'token', name: 'token', autocomplete: 'current-password', required: true });
  const err = el('p', { class: 'error', role: 'alert', id: 'login-error' }, message || '');
  const form = el('form', { class: 'card' },
    el('div', { class: 'row' }, el('label', { for: 'token' }, 'Access token', input),
      el('button', { type: 'submit', class: 'primary' }, 'Log in')), err);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      me = await api('POST', '/login', { token: input.value });
      input.value = '';
      route();
    } catch (e) { err.textContent = e.message; }
  });
  show('Log in', form);
  input.focus();
}

// ---- VM list ----
function listView() {
  const body = el('tbody');
  const table = el('div', { class: 'scroll' }, el('table', { id: 'vms' },
    el('caption', { class: 'skip' }, 'Virtual machines'),
    el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'VM'), el('th', { scope: 'col' }, 'State'),
      el('th', { scope: 'col' }, 'vCPUs'), el('th', { scope: 'col' }, 'Memory'), el('th', { scope: 'col', class: 'hide-narrow' }, 'Uptime'))),
    body));
  const render = (vms) => {
    body.replaceChildren(...vms.map((v) => el('tr', { 'data-vm': v.id },
      el('td', {}, el('a', { href: `#/vm/${encodeURIComponent(v.id)}` }, v.id)),
      el('td', {}, state(v.state)), el('td', {}, v.vcpus ?? '–'), el('td', {}, mib(v.memory_bytes)),
      el('td', { class: 'hide-narrow' }, secs(v.uptime_ms)))));
    if (!vms.length) body.append(el('tr', {}, el('td', { colspan: 5 }, 'No VMs on this host.')));
  };
  const source = new EventSource('/api/vms/stream');
  source.addEventListener('vms', (ev) => render(JSON.parse(ev.data)));
  cleanup.push(() => source.close());
  const id = el('input', { id: 'new-id', placeholder: 'optional' });
  const memory = el('input', { id: 'new-memory', value: '128M', size: 6 });
  const gpu = el('input', { id: 'new-gpu', value: 'emulated,width=640,height=480' });
  const create = el('form', { class: 'card', 'aria-labelledby': 'create-title' },
    el('h2', { id: 'create-title' }, 'Start a new VM'),
    el('div', { class: 'row' }, el('label', { for: 'new-id' }, 'Id', id), el('label', { for: 'new-memory' }, 'Memory', memory),
      el('label', { for: 'new-gpu' }, 'Display', gpu),
      action('Start VM', 'admin', async () => {
        const vm = await api('POST', '/vms', { id: id.value || undefined, memory: memory.value || undefined, gpu: gpu.value || undefined });
        location.hash = `#/vm/${encodeURIComponent(vm.id)}`;
      }, { id: 'create' })));
  create.addEventListener('submit', (ev) => ev.preventDefault());
  show('Virtual machines', table, create);
}

// ---- VM detail ----
function detailView(id) {
  const enc = encodeURIComponent(id);
  const head = el('div', { class: 'card', id: 'summary' });
  const thumbs = el('div', { class: 'thumbs', id: 'thumbs' });
  const events = el('tbody');
  const snaps = el('select', { id: 'snapshot-pick' });
  const snapName = el('input', { id: 'snapshot-name', value: `snap-${Date.now() % 100000}` });
  const progress = el('progress', { id: 'migration-progress', max: 100, value: 0, 'aria-label': 'Migration progress' });
  const migText = el('p', { id: 'migration-text', 'aria-live': 'polite' }, 'No migration started here.');
  const snapProgress = el('p', { id: 'snapshot-text', 'aria-live': 'polite' });
  const metrics = el('pre', { id: 'metrics' });
  const config = el('pre', { id: 'config' });
  let displays = 0;

  const refresh = async () => {
    try {
      const info = await api('GET', `/vms/${enc}`);
      head.replaceChildren(el('p', {}, 'State: ', state(info.state), ` · uptime ${secs(info.uptime_ms)}`,
        info.exit_reason ? ` · ${info.exit_reason}` : ''));
      config.textContent = JSON.stringify(info.config ?? {}, null, 2);
      if (info.state === 'terminated' || info.state === 'error' || info.state === 'dead') return;
      const ev = await api('GET', `/vms/${enc}/events`);
      events.replaceChildren(...ev.slice(-20).reverse().map((e) => el('tr', {},
        el('td', {}, new Date(e.time_ms).toLocaleTimeString()), el('td', {}, `${e.from} → ${e.to}`), el('td', {}, e.cause))));
      const gpus = await api('GET', `/vms/${enc}/gpus`);
      const n = gpus.gpus.reduce((a, g) => a + g.displays.length, 0);
      if (n !== displays) {
        displays = n;
        thumbs.replaceChildren(...Array.from({ length: n }, (_, i) => el('a', { href: `#/vm/${enc}/display/${i}` },
          el('img', { alt: `Display ${i} (open its console)`, 'data-display': i }))));
        if (!n) thumbs.append(el('p', {}, 'This VM has no display.'));
      }
      for (const img of thumbs.querySelectorAll('img')) img.src = `/api/vms/${enc}/display/${img.dataset.display}/screenshot.png?t=${Date.now()}`;
      const list = await api('GET', `/vms/${enc}/snapshots`);
      snaps.replaceChildren(...list.snapshots.map((s) => el('option', { value: s.id }, `${s.id} (${s.state})`)));
      const text = await api('GET', `/vms/${enc}/metrics`);
      metrics.textContent = text.split('\n').filter((l) => l && !l.startsWith('#')).slice(0, 40).join('\n');
    } catch (e) { head.append(el('p', { class: 'error' }, e.message)); }
  };

  const followMigration = async () => {
    try {
      const m = await api('GET', `/vms/${enc}/migration`);
      const s = m.status || m;
      let pct = 0;
      if (m.memory_bytes) pct = Math.min(99, Math.floor(100 * (s.bytes_sent || 0) / m.memory_bytes));
      const ok = s.state === 'completed' && (s.vm === 'migrated' || s.vm === 'running');
      if (ok) pct = 100;
      progress.value = pct;
      progress.dataset.state = s.state;
      migText.replaceChildren(`${s.state} · pass ${s.pass ?? '–'} · ${mib(s.bytes_sent)} sent`,
        s.error ? ` · ${s.error}` : '',
        m.target && ok ? el('span', {}, ' · now ', el('a', { href: `#/vm/${encodeURIComponent(m.target)}`, id: 'migration-target' }, m.target)) : '');
      if (m.done === false) setTimeout(followMigration, 300);
    } catch (e) { if (e.status !== 404) migText.textContent = e.message; }
  };

  const lifecycle = (a) => action(a[0].toUpperCase() + a.slice(1), 'operator', async () => {
    await api('POST', `/vms/${enc}/${a}`); await refresh();
  }, { id: `do-${a}` });

  const snapshotButton = action('Take snapshot', 'operator', async () => {
    const poll = setInterval(async () => {
      const p = await api('GET', `/vms/${enc}/snapshots/progress`).catch(() => null);
      if (p && p.total_bytes) snapProgress.textContent = `writing ${mib(p.done_bytes)} of ${mib(p.total_bytes)}`;
    }, 200);
    try { const s = await api('POST', `/vms/${enc}/snapshots`, { name: snapName.value }); snapProgress.textContent = `snapshot ${s.id} written`; }
    finally { clearInterval(poll); }
    await refresh();
  }, { id: 'do-snapshot' });

  const timer = setInterval(refresh, 2000);
  cleanup.push(() => clearInterval(timer));
  const source = new EventSource('/api/vms/stream');
  source.addEventListener('vms', (ev) => { const v = JSON.parse(ev.data).find((x) => x.id === id); if (v) refresh(); });
  cleanup.push(() => source.close());

  show(`VM ${id}`, head,
    el('div', { class: 'row', role: 'group', 'aria-label': 'Lifecycle' }, ['start', 'pause', 'resume', 'stop'].map(lifecycle),
      el('a', { href: `#/vm/${enc}/serial`, id: 'open-serial' }, 'Serial console')),
    el('h2', {}, 'Displays'), thumbs,
    el('h2', {}, 'Snapshots'),
    el('div', { class: 'row' }, el('label', { for: 'snapshot-name' }, 'Name', snapName), snapshotButton,
      el('label', { for: 'snapshot-pick' }, 'Snapshot', snaps),
      action('Restore as new VM', 'admin', async () => {
        const vm = await api('POST', `/vms/${enc}/restore`, { name: snaps.value });
        location.hash = `#/vm/${encodeURIComponent(vm.id)}`;
      }, { id: 'do-restore' })),
    snapProgress,
    el('h2', {}, 'Migration'),
    el('div', { class: 'row' },
      action('Migrate (this host)', 'admin', async () => { await api('POST', `/vms/${enc}/migration`); followMigration(); }, { id: 'do-migrate' }),
      action('Cancel migration', 'operator', async () => { await api('POST', `/vms/${enc}/migration/cancel`); }, { id: 'do-cancel' })),
    progress, migText,
    el('h2', {}, 'Events'), el('div', { class: 'scroll' }, el('table', { id: 'events' }, el('tbody', {}, events))),
    el('h2', {}, 'Configuration'), config,
    el('h2', {}, 'Metrics'), metrics);
  refresh();
  followMigration();
}

// ---- graphical console (noVNC) ----
function displayView(id, n) {
  const enc = encodeURIComponent(id);
  const screen = el('div', { id: 'screen' });
  const status = el('p', { id: 'vnc-status', 'aria-live': 'polite' }, 'Connecting…');
  show(`VM ${id}: display ${n}`, el('p', {}, el('a', { href: `#/vm/${enc}` }, `Back to ${id}`),
    may('operator') ? '' : ' · view only (viewer role)'), status, screen,
    el('p', {}, 'The keyboard goes to the guest while the screen has focus. On a virtio-gpu display the resolution follows the window for read-write viewers; an emulated display keeps its configured size.'));
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/api/vms/${enc}/vnc/${n}`;
  const rfb = new RFB(screen, url, { wsProtocols: ['binary'] });
  rfb.viewOnly = !may('operator');
  rfb.scaleViewport = false;
  rfb.addEventListener('connect', () => { status.textContent = 'Connected'; status.dataset.connected = '1'; });
  rfb.addEventListener('disconnect', (e) => { status.textContent = e.detail.clean ? 'Disconnected' : 'Connection lost'; delete status.dataset.connected; });
  window.rayRfb = rfb;
  cleanup.push(() => { try { rfb.disconnect(); } catch (_) { /* already closed */ } });
  if (may('operator')) followWindow(enc, n, screen, rfb);
}

// A read-write viewer of a virtio display: the console fills the window (its width a
// multiple of 8 pixels, as display widths are) and noVNC asks the server for that size
// (ExtendedDesktopSize); the guest gets a display event and redraws.
async function followWindow(enc, n, screen, rfb) {
  let gpus;
  try { gpus = await api('GET', `/vms/${enc}/gpus`); } catch (_) { return; }
  const gpu = gpus.gpus.find((g) => g.displays.some((d) => d.index === Number(n)));
  if (!gpu || gpu.type !== 'paravirt' || !screen.isConnected) return;
  const fit = () => {
    const box = screen.parentElement;
    const cs = getComputedStyle(box);
    const room = box.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
    const top = screen.getBoundingClientRect().top + window.scrollY;
    // At least the smallest display (320x200): a smaller window scrolls.
    screen.style.width = `${Math.max(320, Math.floor(room / 8) * 8)}px`;
    screen.style.height = `${Math.max(200, Math.floor(window.innerHeight - top - 8))}px`;
  };
  fit();
  screen.dataset.follow = '1';
  window.addEventListener('resize', fit);
  cleanup.push(() => window.removeEventListener('resize', fit));
  rfb.resizeSession = true;
}

// ---- serial console (xterm.js) ----
function serialView(id) {
  const enc = encodeURIComponent(id);
  const box = el('div', { id: 'terminal' });
  const status = el('p', { id: 'serial-status', 'aria-live': 'polite' }, 'Connecting…');
  show(`VM ${id}: serial console`, el('p', {}, el('a', { href: `#/vm/${enc}` }, `Back to ${id}`)), status, box);
  const term = new window.Terminal({ convertEol: true, scrollback: 5000, cols: 80, rows: 24 });
  term.open(box);
  const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/api/vms/${enc}/serial`);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => { status.textContent = 'Connected'; status.dataset.connected = '1'; };
  ws.onmessage = (ev) => {
    if (typeof ev.data !== 'string') { term.write(new Uint8Array(ev.data)); return; }
    const m = JSON.parse(ev.data);
    if (m.mode) status.textContent = m.mode === 'write' ? 'Connected: you type into the console' : 'Connected: read only';
    if (m.notice) term.write(`\r\n[${m.notice}]\r\n`);
    if (m.end) status.textContent = 'The VM has ended';
  };
  ws.onclose = () => { delete status.dataset.connected; if (!status.textContent.startsWith('The VM')) status.textContent = 'Disconnected'; };
  term.onData((d) => { if (ws.readyState === 1) ws.send(new TextEncoder().encode(d)); });
  window.rayTerm = term;
  term.focus();
  cleanup.push(() => { ws.close(); term.dispose(); });
}

// ---- routing ----
async function route() {
  for (const f of cleanup) f();
  cleanup = [];
  if (!me) {
    try { me = await api('GET', '/me'); } catch (_) { me = null; }
  }
  document.getElementById('session').hidden = !me;
  document.getElementById('who').textContent = me ? `${me.name} (${me.role})` : '';
  if (!me) return loginView();
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  if (parts[0] === 'vm' && parts[1]) {
    if (parts[2] === 'display') return displayView(parts[1], Number(parts[3] || 0));
    if (parts[2] === 'serial') return serialView(parts[1]);
    return detailView(parts[1]);
  }
  return listView();
}

document.getElementById('logout').addEventListener('click', async () => {
  await api('POST', '/logout').catch(() => {});
  me = null;
  location.hash = '#/';
  route();
});
window.addEventListener('hashchange', route);
route();
