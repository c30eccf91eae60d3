// One process = one real @yomo/presence client, driven by JSON lines.
//
// stdin:  one command object per line, e.g. {"cmd":"join","req":2,"channel":"c","state":{}}
// stdout: one event object per line, e.g. {"ev":"ok","req":2} or {"ev":"peers",...}
// stderr: free-form logs (the client's console output is redirected here).
//
// Commands: connect {url, publickey, id, debug?, rejoin?}, join {channel, state?},
//   subscribe {channel, event}, broadcast {channel, event, data}, leave {channel},
//   unload (dispatch `beforeunload`, as a closing browser tab does),
//   disconnect {code?, reason?} (close the current WebSocket cleanly), exit.
// Events: ready, ok, error, status, peers, data, ws_open, ws_close, ws_rejected, ws_error,
//   rejoined (rejoin: the app pattern of docs/presence.md, joining again on `open`).

import { Console } from 'node:console';
import { createInterface } from 'node:readline';
import { WebSocket as WsWebSocket } from 'ws';

/** @param {Record<string, unknown>} obj */
function emit(obj) {
  // stdout is a pipe: writes are synchronous on Linux, so nothing is lost on exit.
  process.stdout.write(JSON.stringify(obj) + '\n');
}

/** @param {unknown} e */
function describe(e) {
  return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
}

process.on('uncaughtException', (e) => emit({ ev: 'error', message: 'uncaught ' + describe(e), stack: e?.stack }));
process.on('unhandledRejection', (e) => emit({ ev: 'error', message: 'unhandled rejection ' + describe(e) }));

// The client logs with console.*: keep stdout for the JSON protocol.
globalThis.console = new Console({ stdout: process.stderr, stderr: process.stderr });

/** Every socket the client opened, numbered from 1; the last one is the live one. */
let wsCount = 0;
/** @type {PuppetWebSocket | null} */
let currentWs = null;

/** A `ws` WebSocket that accepts the dev certificate and reports what the server did. */
class PuppetWebSocket extends WsWebSocket {
  /**
   * @param {string} url
   * @param {string | string[]} [protocols]
   * @param {import('ws').ClientOptions} [options]
   */
  constructor(url, protocols, options) {
    super(url, protocols, { ...options, rejectUnauthorized: false });
    const n = ++wsCount;
    currentWs = this;
    let opened = false;
    this.on('open', () => {
      opened = true;
      emit({ ev: 'ws_open', n });
    });
    this.on('unexpected-response', (_req, res) => {
      // Having this listener stops `ws` from aborting by itself: read the body, report,
      // then abort as `ws` would have (error event, then close 1006).
      let body = '';
      const done = () => {
        clearTimeout(timer);
        if (this.readyState !== WsWebSocket.CONNECTING) return;
        emit({ ev: 'ws_rejected', n, status: res.statusCode, headers: res.headers, body: body.slice(0, 1000) });
        connectFailed(`handshake rejected with HTTP ${res.statusCode}`, { status: res.statusCode, headers: res.headers });
        this.terminate();
      };
      const timer = setTimeout(done, 1000);
      res.setEncoding('utf8');
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', done);
      res.on('error', done);
    });
    this.on('error', (e) => emit({ ev: 'ws_error', n, message: describe(e) }));
    this.on('close', (code, reason) => {
      emit({ ev: 'ws_close', n, code, reason: reason.toString('utf8'), opened });
      if (!opened) connectFailed(`connection closed before open (code ${code})`, {});
    });
  }
}
globalThis.WebSocket = PuppetWebSocket;
// The client needs an EventTarget `window` before import: the bundled polyfill installs
// itself as window.WebTransport at import time, and each Channel listens to `beforeunload`.
globalThis.window = /** @type {any} */ (new EventTarget());
const { createPresence } = await import('@yomo/presence');

/** @type {any} */
let presence = null;
/** @type {number | null} req of the connect command still waiting for its reply */
let connectReq = null;

/** @typedef {{channel: any, unsubs: Function[], left: boolean, state: any}} Joined */
/** @type {Map<string, Joined>} */
const channels = new Map();

/**
 * @param {string} message
 * @param {Record<string, unknown>} extra
 */
function connectFailed(message, extra) {
  if (connectReq === null) return;
  emit({ ev: 'error', req: connectReq, message, ...extra });
  connectReq = null;
}

/**
 * @param {string} name
 * @param {boolean} [evenIfLeft] also return a channel that was left
 */
function joined(name, evenIfLeft = false) {
  const j = channels.get(name);
  if (!j || (j.left && !evenIfLeft)) throw new Error(`channel ${name} not joined`);
  return j;
}

/** @type {Record<string, (cmd: any) => Promise<void> | void>} */
const handlers = {
  async connect({ req, url, publickey, id, debug = false, rejoin = false }) {
    if (presence || connectReq !== null) throw new Error('already connected');
    connectReq = req ?? 0;
    const p = await createPresence(url, { publicKey: publickey, id, debug, autoDowngrade: true });
    presence = p;
    for (const status of ['open', 'closed', 'connecting']) {
      p.on(status, (/** @type {any} */ s) => emit({ ev: 'status', status: s.status, details: s.details }));
    }
    if (rejoin) {
      // The client never joins its channels again after a reconnect: the app does.
      p.on('open', async () => {
        for (const [name, j] of channels) {
          if (j.left) continue;
          for (const unsub of j.unsubs) unsub();
          channels.delete(name);
          await handlers.join({ channel: name, state: j.state });
          emit({ ev: 'rejoined', channel: name });
        }
      });
    }
    emit({ ev: 'status', status: 'open', details: 'createPresence resolved' });
    if (connectReq === null) return 'replied';
    connectReq = null;
  },

  async join({ channel: name, state }) {
    if (!presence) throw new Error('not connected');
    if (channels.get(name)?.left === false) throw new Error(`channel ${name} already joined`);
    // joinChannel resolves only a few microtasks after the ack, and member updates that
    // arrive with the ack would be missed by a later subscribePeers: catch the Channel
    // object as Presence stores it (synchronously, before any frame is read).
    /** @type {any} */
    let channel = null;
    const origSet = Map.prototype.set;
    Map.prototype.set = function (k, v) {
      if (k === name && v && typeof v.subscribePeers === 'function') channel = v;
      return origSet.call(this, k, v);
    };
    let joinPromise;
    try {
      joinPromise = presence.joinChannel(name, state ?? undefined);
    } finally {
      Map.prototype.set = origSet;
    }
    /** @type {Joined} */
    const j = { channel: null, unsubs: [], left: false, state };
    const attach = (/** @type {any} */ ch) => {
      j.channel = ch;
      j.unsubs.push(ch.subscribePeers((/** @type {any[]} */ peers) => emit({ ev: 'peers', channel: name, peers })));
      channels.set(name, j);
    };
    if (channel) attach(channel);
    const resolved = await joinPromise;
    if (!channel) attach(resolved);
  },

  subscribe({ channel: name, event }) {
    const j = joined(name);
    j.unsubs.push(j.channel.subscribe(event, (/** @type {any} */ data, /** @type {any} */ peer) =>
      emit({ ev: 'data', channel: name, event, data, from: peer?.id })));
  },

  broadcast({ channel: name, event, data }) {
    // Allowed after leave: the client lets you, and the server must drop it.
    joined(name, true).channel.broadcast(event, data);
  },

  leave({ channel: name }) {
    const j = joined(name);
    // The old Channel object keeps reading the socket: detach our callbacks so a later
    // re-join of the same channel is not reported twice.
    for (const unsub of j.unsubs) unsub();
    j.unsubs = [];
    j.left = true;
    j.channel.leave();
  },

  unload() {
    window.dispatchEvent(new Event('beforeunload'));
  },

  disconnect({ code = 1000, reason = 'puppet disconnect' }) {
    if (!currentWs) throw new Error('no socket');
    currentWs.close(code, reason);
  },

  exit() {
    setImmediate(() => process.exit(0)); // after the ok reply and any replies already due
  },
};

/** @param {string} line */
async function handle(line) {
  if (!line.trim()) return;
  /** @type {any} */
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    emit({ ev: 'error', message: 'bad JSON: ' + describe(e), line });
    return;
  }
  const req = cmd.req ?? null;
  try {
    const fn = handlers[cmd.cmd];
    if (!fn) throw new Error(`unknown command ${JSON.stringify(cmd.cmd)}`);
    if ((await fn(cmd)) === 'replied') return;
    emit({ ev: 'ok', req });
  } catch (e) {
    emit({ ev: 'error', req, message: describe(e) });
  }
}

const rl = createInterface({ input: process.stdin });
// Commands run concurrently (a join may wait for its ack while a broadcast goes out).
rl.on('line', (line) => { void handle(line); });
rl.on('close', () => process.exit(0));
emit({ ev: 'ready', pid: process.pid });
