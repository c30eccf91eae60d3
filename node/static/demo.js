// prscd demo: the real @yomo/presence client (served by this node as /presence.js).
//
// Shows who is online in a channel with their state, live cursors sent with
// channel.broadcast('cursor', ...), which transport the client really uses, and the
// MESH_ID of the node that answered. URL parameters: channel, id, name, publickey.
//
// Everything it knows is also on `window.prscdDemo`, which the browser tests read.

const COLORS = ['#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#42d4f4', '#f032e6', '#469990'];

/** @param {'webtransport' | 'websocket'} mode */
export async function start(mode) {
  const params = new URLSearchParams(location.search);
  const id = params.get('id') || 'user-' + Math.random().toString(36).slice(2, 8);
  const channelName = params.get('channel') || 'demo';
  const publicKey = params.get('publickey') || 'demo';
  const name = (params.get('name') || id).slice(0, 40);
  const color = COLORS[Math.floor(Math.random() * COLORS.length)];

  const demo = {
    mode, id, channel: channelName, name, color,
    transport: 'not connected yet', status: 'connecting', meshId: '?', joined: false,
    /** @type {Array<Record<string, unknown>>} */ peers: [],
    /** @type {Record<string, {x: number, y: number}>} */ cursors: {},
    /** @type {Array<{event: string, data: unknown, from: string}>} */ received: [],
    /** @type {(event: string, data: unknown) => void} */ broadcast: () => {},
  };
  window.prscdDemo = demo;
  const $ = (/** @type {string} */ sel) => /** @type {HTMLElement} */ (document.querySelector(sel));

  // Which class will the client construct? Decided before presence.js is imported:
  // it installs its WebSocket polyfill as window.WebTransport only when none exists.
  const native = window.WebTransport;
  if (mode === 'websocket') delete window.WebTransport;
  // When native WebTransport fails, the client builds its polyfill directly (not via
  // window.WebTransport); the polyfill announces itself on console.info.
  const info = console.info.bind(console);
  console.info = (...args) => {
    if (args.some((a) => String(a).startsWith('WebTransport polyfilled'))) {
      demo.transport = 'WebSocket polyfill (downgraded)';
      render();
    }
    info(...args);
  };
  const { createPresence } = await import('/presence.js');
  const installed = window.WebTransport;
  window.WebTransport = new Proxy(installed, {
    construct(target, args) {
      const conn = Reflect.construct(target, args);
      const kind = native && target === native ? 'native WebTransport (HTTP/3)' : 'WebSocket polyfill';
      conn.ready.then(() => { demo.transport = kind; render(); }, () => {});
      return conn;
    },
  });

  fetch('/health').then((r) => r.json()).then((h) => { demo.meshId = h.mesh_id; render(); }, () => {});

  $('#me').textContent = `${name} (${id})`;
  $('#channel').textContent = channelName;
  render();

  const presence = await createPresence(`https://${location.host}/v1`, { publicKey, id });
  for (const status of ['open', 'closed', 'connecting']) {
    presence.on(status, () => { demo.status = status; render(); });
  }
  demo.status = 'open';
  const channel = await presence.joinChannel(channelName, { name, color });
  demo.joined = true;
  demo.broadcast = (event, data) => channel.broadcast(event, data);

  channel.subscribePeers((/** @type {Array<Record<string, unknown>>} */ peers) => {
    demo.peers = peers.map((p) => ({ ...p }));
    const online = new Set(peers.map((p) => String(p.id)));
    for (const key of Object.keys(demo.cursors)) if (!online.has(key)) delete demo.cursors[key];
    render();
  });
  channel.subscribe('cursor', (/** @type {{x: number, y: number}} */ data, /** @type {{id: string}} */ from) => {
    demo.cursors[from.id] = { x: Number(data.x) || 0, y: Number(data.y) || 0 };
    demo.received.push({ event: 'cursor', data, from: from.id });
    render();
  });
  channel.subscribe('hello', (/** @type {unknown} */ data, /** @type {{id: string}} */ from) => {
    demo.received.push({ event: 'hello', data, from: from.id });
    render();
  });

  const board = $('#board');
  let last = 0;
  board.addEventListener('pointermove', (ev) => {
    const now = performance.now();
    if (now - last < 40) return; // at most 25 messages a second
    last = now;
    const box = board.getBoundingClientRect();
    channel.broadcast('cursor', { x: (ev.clientX - box.left) / box.width, y: (ev.clientY - box.top) / box.height });
  });
  render();
}

function render() {
  const demo = window.prscdDemo;
  const $ = (/** @type {string} */ sel) => /** @type {HTMLElement} */ (document.querySelector(sel));
  $('#transport').textContent = demo.transport;
  $('#transport').className = demo.transport.startsWith('native') ? 'good' : 'meh';
  $('#status').textContent = demo.joined ? `${demo.status}, joined` : demo.status;
  $('#mesh').textContent = demo.meshId;

  // Peer state comes from other clients: text only, never HTML.
  const list = $('#peers');
  list.replaceChildren();
  for (const peer of demo.peers) {
    const li = document.createElement('li');
    const dot = document.createElement('span');
    dot.className = 'dot';
    dot.style.background = safeColor(peer.color);
    const label = document.createElement('b');
    label.textContent = String(peer.name ?? peer.id);
    const state = document.createElement('code');
    state.textContent = JSON.stringify(peer);
    li.append(dot, label, ' ', state);
    list.append(li);
  }
  $('#count').textContent = String(demo.peers.length);

  const board = $('#board');
  board.querySelectorAll('.cursor').forEach((el) => el.remove());
  for (const [id, pos] of Object.entries(demo.cursors)) {
    const peer = demo.peers.find((p) => String(p.id) === id);
    const el = document.createElement('div');
    el.className = 'cursor';
    el.style.left = `${Math.min(Math.max(pos.x, 0), 1) * 100}%`;
    el.style.top = `${Math.min(Math.max(pos.y, 0), 1) * 100}%`;
    el.style.borderColor = safeColor(peer?.color);
    el.textContent = String(peer?.name ?? id);
    board.append(el);
  }
}

/** @param {unknown} value */
function safeColor(value) {
  return typeof value === 'string' && /^#[0-9a-f]{6}$/i.test(value) ? value : '#888888';
}
