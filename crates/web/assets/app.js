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
        thumbs.replaceChildren(...Array.from({ length: n }, (_, i) => el('div', {},
          el('a', { href: `#/vm/${enc}/display/${i}` }, el('img', { alt: `Display ${i} (open its console)`, 'data-display': i })),
          el('a', { href: `#/vm/${enc}/h264/${i}`, class: 'h264-link' }, `Display ${i}: low-bandwidth view (H.264)`))));
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

// ---- low-bandwidth viewer: the display's H.264 stream decoded with WebCodecs ----
// The server sends whole access units (Annex B); a new one starts at an access unit
// delimiter, SPS, PPS or SEI, or at a slice whose first_mb_in_slice is 0, after a slice.
function accessUnits(bytes) {
  const starts = [];
  for (let i = 0; i + 2 < bytes.length; i++) {
    if (bytes[i] === 0 && bytes[i + 1] === 0 && bytes[i + 2] === 1) { starts.push(i + 3); i += 2; }
  }
  const units = [];
  let cur = null;
  for (let k = 0; k < starts.length; k++) {
    const at = starts[k];
    let begin = at - 3;
    if (begin > 0 && bytes[begin - 1] === 0) begin--;
    const type = bytes[at] & 0x1f;
    const vcl = type === 1 || type === 5;
    const firstSlice = vcl && (bytes[at + 1] & 0x80) !== 0;
    if (!cur || (cur.vcl && ([6, 7, 8, 9].includes(type) || firstSlice))) {
      if (cur) units.push(cur);
      cur = { begin, vcl: false, key: false, sps: null };
    }
    if (vcl) cur.vcl = true;
    if (type === 5) cur.key = true;
    if (type === 7) cur.sps = bytes.subarray(at + 1, at + 4);
  }
  if (cur) units.push(cur);
  return units.map((u, i) => ({ ...u, data: bytes.subarray(u.begin, i + 1 < units.length ? units[i + 1].begin : bytes.length) }));
}

function h264View(id, n) {
  const enc = encodeURIComponent(id);
  const canvas = el('canvas', { id: 'h264-canvas', width: 0, height: 0 });
  const status = el('p', { id: 'h264-status', 'aria-live': 'polite' }, 'Connecting…');
  show(`VM ${id}: display ${n} (H.264)`, el('p', {}, el('a', { href: `#/vm/${enc}` }, `Back to ${id}`),
    ' · view only, decoded in the browser (WebCodecs)'), status, el('div', { id: 'screen' }, canvas));
  if (typeof VideoDecoder === 'undefined') {
    status.textContent = 'This browser has no WebCodecs VideoDecoder (it needs a secure context: https or 127.0.0.1).';
    return;
  }
  let frames = 0, bytes = 0, decoder = null, ts = 0;
  const ctx = canvas.getContext('2d');
  const decoderFor = () => new VideoDecoder({
    output: (frame) => {
      if (canvas.width !== frame.displayWidth || canvas.height !== frame.displayHeight) {
        canvas.width = frame.displayWidth; canvas.height = frame.displayHeight;
      }
      ctx.drawImage(frame, 0, 0);
      frame.close();
      frames++;
      status.dataset.frames = String(frames);
      status.textContent = `Decoding: ${frames} frames, ${Math.round(bytes / 1024)} KiB received`;
    },
    error: (e) => { status.textContent = `Decoder error: ${e.message}`; },
  });
  const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/api/vms/${enc}/h264/${n}`);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => { status.textContent = 'Connected: waiting for the first frame'; status.dataset.connected = '1'; };
  ws.onmessage = (ev) => {
    const data = new Uint8Array(ev.data);
    bytes += data.length;
    for (const au of accessUnits(data)) {
      if (au.sps && (!decoder || au.key)) {
        const hex = Array.from(au.sps, (b) => b.toString(16).padStart(2, '0')).join('');
        if (decoder) decoder.close();
        decoder = decoderFor();
        decoder.configure({ codec: `avc1.${hex}`, optimizeForLatency: true });
      }
      if (!decoder || decoder.state !== 'configured') continue;
      decoder.decode(new EncodedVideoChunk({ type: au.key ? 'key' : 'delta', timestamp: ts, data: au.data }));
      ts += 1000;
    }
  };
  ws.onclose = () => { delete status.dataset.connected; if (!frames) status.textContent = 'Disconnected'; };
  cleanup.push(() => { ws.close(); if (decoder && decoder.state !== 'closed') decoder.close(); });
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

// ---- hosts (the cluster store, through ray web's /api/hosts) ----
function hostsView() {
  const body = el('tbody');
  const status = el('p', { id: 'hosts-status', 'aria-live': 'polite' }, 'Reading the cluster…');
  const migrations = el('ul', { id: 'cluster-migrations' });
  const drainStart = {}; // host -> VMs it had when this page first saw it draining
  const table = el('div', { class: 'scroll' }, el('table', { id: 'hosts' },
    el('caption', { class: 'skip' }, 'Hosts'),
    el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Host'), el('th', { scope: 'col' }, 'State'),
      el('th', { scope: 'col', class: 'hide-narrow' }, 'Role'), el('th', { scope: 'col', class: 'hide-narrow' }, 'Load'), el('th', { scope: 'col' }, 'VMs'),
      el('th', { scope: 'col' }, 'Actions'))),
    body));
  const act = (host, op, label) => action(label, 'operator', () => api('POST', `/hosts/${encodeURIComponent(host)}/${op}`),
    { 'data-op': op, 'aria-label': `${label} host ${host}` });
  const render = (o) => {
    status.textContent = `Leader: ${o.leader ?? 'none'} · ${o.hosts.length} host(s) · ${o.vms_pending} VM(s) waiting for a host`;
    body.replaceChildren(...o.hosts.map((h) => {
      const load = h.cpus != null
        ? `${h.vcpus_used}/${h.cpus} vCPUs · ${h.memory_used_mib}/${h.memory_mib} MiB`
        : `${h.vcpus_used} vCPUs · ${h.memory_used_mib} MiB`;
      const cells = [];
      if (h.draining) {
        const start = Math.max(drainStart[h.host] ?? 0, h.vms.length);
        drainStart[h.host] = start;
        const done = start === 0 ? 100 : Math.round(100 * (start - h.vms.length) / start);
        cells.push(el('progress', { class: 'drain', max: 100, value: done, 'aria-label': `Drain of ${h.host}` }),
          el('span', { class: 'vms-left', 'data-left': h.vms.length }, `${h.vms.length} VM(s) left`));
      } else delete drainStart[h.host];
      const state_ = h.state.split(' ')[0];
      return el('tr', { 'data-host': h.host },
        el('th', { scope: 'row' }, h.host),
        el('td', {}, el('span', { class: `state ${state_.toLowerCase()}`, 'data-state': state_ }, h.state), ...cells),
        el('td', { class: 'hide-narrow' }, h.role), el('td', { class: 'hide-narrow' }, load),
        el('td', {}, h.vms.length ? h.vms.map((v) => el('span', { class: 'vm', 'data-vm': v }, v)) : '–'),
        el('td', {}, el('div', { class: 'row' },
          h.cordoned || h.draining ? act(h.host, 'uncordon', 'Uncordon') : act(h.host, 'cordon', 'Cordon'),
          h.draining ? act(h.host, 'drain-abort', 'Abort drain') : act(h.host, 'drain', 'Start drain'))));
    }));
    if (!o.hosts.length) body.append(el('tr', {}, el('td', { colspan: 6 }, 'No host has registered.')));
    migrations.replaceChildren(...o.migrations.map((m) => el('li', { 'data-vm': m.vm },
      `${m.vm}${m.cause ? ` (${m.cause})` : ''}: ${m.progress}`)));
    if (!o.migrations.length) migrations.append(el('li', {}, 'None under way.'));
  };
  api('GET', '/hosts').then(() => {
    const source = new EventSource('/api/hosts/stream');
    source.addEventListener('hosts', (ev) => render(JSON.parse(ev.data)));
    source.addEventListener('unreachable', (ev) => { status.textContent = `The cluster store does not answer: ${JSON.parse(ev.data).message}`; });
    cleanup.push(() => source.close());
  }).catch((e) => { status.textContent = e.message; });
  show('Hosts', status, table, el('h2', {}, 'Migrations'), migrations);
}

// ---- routing ----
async function route() {
  for (const f of cleanup) f();
  cleanup = [];
  if (!me) {
    try { me = await api('GET', '/me'); } catch (_) { me = null; }
  }
  document.getElementById('session').hidden = !me;
  document.getElementById('pages').hidden = !me;
  document.getElementById('who').textContent = me ? `${me.name} (${me.role})` : '';
  if (!me) return loginView();
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  if (parts[0] === 'hosts') return hostsView();
  if (parts[0] === 'vm' && parts[1]) {
    if (parts[2] === 'display') return displayView(parts[1], Number(parts[3] || 0));
    if (parts[2] === 'serial') return serialView(parts[1]);
    if (parts[2] === 'h264') return h264View(parts[1], Number(parts[3] || 0));
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
