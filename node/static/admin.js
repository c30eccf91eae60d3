// The operations page: polls /v1/admin/overview (node/admin.py) every second, no reload.
// On the server API the JSON needs a key: the page asks for it once, keeps it in this
// tab's sessionStorage and sends it as `Authorization: Bearer` (docs/operations.md).
// Every value goes into the DOM as text (channel names are chosen by clients).
'use strict';

const OVERVIEW = '/v1/admin/overview';
const POLL_MS = 1000;
const KEY = 'prscd-admin-key';
/** State the tests read (tests/e2e/test_admin_browser.py). */
const state = (window.prscdAdmin = { polls: 0, errors: 0, status: 'waiting', last: null });

const $ = (id) => document.getElementById(id);

/** @param {string} tag @param {Record<string, any>} attrs @param {...any} kids */
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const kid of kids) e.append(kid instanceof Node ? kid : String(kid ?? ''));
  return e;
}

function num(n, digits = 0) {
  if (n === null || n === undefined) return '–';
  return Number(n).toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function duration(s) {
  if (s === null || s === undefined) return '–';
  if (s < 60) return `${num(s, 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function age(s) {
  return s === null || s === undefined ? '–' : `${num(s, 1)} s`;
}

function badge(st) {
  return el('span', { class: `badge ${st}` }, st);
}

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colSpan: 10, class: 'muted' }, empty))]));
}

function render(o) {
  const me = o.node;
  $('me').replaceChildren(
    el('strong', {}, me.mesh_id), ' · ', el('code', {}, me.node_id), ` · v${me.version}`,
    ` · up ${duration(me.uptime_s)} · bus ${me.bus.kind} `,
    el('span', { class: `badge ${me.bus.state === 'connected' || me.bus.kind === 'embedded' ? 'alive' : 'dead'}` }, me.bus.state),
    me.draining ? el('span', {}, ' ', badge('draining')) : '',
  );
  $('regions').replaceChildren(...o.regions.map((r) => el('div', { class: `card ${r.state}`, 'data-region': r.mesh_id, 'data-state': r.state },
    el('h3', {}, r.mesh_id, badge(r.state)),
    el('div', {}, el('span', { class: 'big' }, num(r.peers)), ' peers · ', num(r.channels), ' channels'),
    el('div', { class: 'muted' }, `nodes: ${r.alive} alive`, r.draining ? `, ${r.draining} draining` : '', r.dead ? `, ${r.dead} dead` : ''),
  )));
  const labels = { handled: 'frames handled', delivered: 'deliveries', published: 'mesh published', received: 'mesh received' };
  const dropRate = o.dropped.reduce((a, d) => a + d.per_s, 0);
  $('rates').replaceChildren(
    ...Object.entries(labels).map(([k, label]) => el('div', { class: 'card', 'data-rate': k },
      el('div', { class: 'big' }, num(o.rates[k], 1)), el('div', { class: 'muted' }, label))),
    el('div', { class: `card ${dropRate > 0 ? 'dead' : ''}`, 'data-rate': 'dropped' },
      el('div', { class: 'big' }, num(dropRate, 1)), el('div', { class: 'muted' }, 'dropped')),
  );
  fill($('nodes').tBodies[0], o.nodes.map((n) => el('tr', { class: `${n.state}${n.self ? ' self' : ''}`, 'data-node': n.node, 'data-state': n.state },
    el('td', {}, el('code', {}, n.node)), el('td', {}, n.mesh_id),
    el('td', { title: n.reason || '' }, badge(n.state), n.reason ? el('span', { class: 'muted small' }, ` ${n.reason}`) : ''),
    el('td', { class: 'n' }, num(n.peers)), el('td', { class: 'n' }, num(n.channels)),
    el('td', { class: 'n' }, n.state === 'dead' ? `dead ${duration(n.dead_for_s)}` : age(n.heartbeat_age_s)),
    el('td', { class: 'n' }, n.rates ? num(n.rates.handled, 1) : '–'),
    el('td', { class: 'n' }, n.rates ? num(n.rates.delivered, 1) : '–'),
    el('td', { class: 'n' }, duration(n.uptime_s)), el('td', {}, n.version ?? '–'),
  )), 'no nodes');
  fill($('channels').tBodies[0], o.channels.map((c) => el('tr', { 'data-channel': c.channel },
    el('td', { class: 'name' }, c.app), el('td', { class: 'name', title: c.channel }, c.channel),
    el('td', { class: 'n' }, num(c.members)), el('td', { class: 'n' }, num(c.connections)),
    el('td', { class: 'n' }, num(c.nodes)),
  )), 'no channel has members');
  fill($('drops').tBodies[0], o.dropped.map((d) => el('tr', { 'data-reason': d.reason },
    el('td', {}, d.reason), el('td', { class: 'n' }, num(d.total)), el('td', { class: 'n' }, num(d.per_s, 1)),
  )), 'nothing dropped');
  const missing = o.missing.length ? ` · did not answer in time: ${o.missing.join(', ')}` : '';
  $('footer').textContent = `node timeout ${o.node_timeout_s} s, heartbeat every ${o.heartbeat_interval_s} s · updated ${new Date(o.generated_at * 1000).toLocaleTimeString()}${missing}`;
}

function setLive(status, text) {
  state.status = status;
  $('live').className = `badge ${status}`;
  $('live').textContent = text;
}

function askKey(message) {
  $('keyform').hidden = false;
  $('keyerror').textContent = message;
  $('key').focus();
}

async function poll() {
  const key = sessionStorage.getItem(KEY);
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  try {
    const res = await fetch(OVERVIEW, { headers, cache: 'no-store' });
    if (res.status === 401) {
      sessionStorage.removeItem(KEY);
      setLive('error', 'key needed');
      askKey(key ? 'that key was not accepted' : '');
      return; // polling resumes when a key is entered
    }
    if (!res.ok) throw new Error(`${res.status} ${(await res.text()).slice(0, 200)}`);
    const o = await res.json();
    state.last = o;
    state.polls += 1;
    $('keyform').hidden = true;
    $('main').hidden = false;
    render(o);
    setLive('live', 'live');
  } catch (e) {
    state.errors += 1;
    setLive('error', `no answer: ${e.message || e}`);
  }
  setTimeout(poll, POLL_MS);
}

$('keyform').addEventListener('submit', (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $('key').value.trim());
  $('key').value = '';
  $('keyform').hidden = true;
  poll();
});

poll();
