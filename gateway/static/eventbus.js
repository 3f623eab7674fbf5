// eventbus.js: the browser client of the eventbus gateway (docs/protocol.md, docs/browser.md).
//
// A dependency-free ES module. One connection carries every project the page subscribes to; per
// project it delivers events in sequence order, exactly once, and calls the application's
// onResync(projectId) whenever the application must reload its state (first subscribe, and every
// `resync_required`). It reconnects forever with jittered exponential backoff and resumes each
// project from its cursor. Transports, best first: WebSocket; Server-Sent Events (read with fetch(),
// since EventSource cannot send the Authorization header) while WebSocket cannot connect; HTTP
// polling every 10 s only while neither works (an SSE stream counts once it has answered: a
// proxy may pass its headers and hold its body). WebSocket is retried on its backoff all along, and
// the client moves back up as soon as a better transport works again.
//
// The decisions (backoff schedule, cursor/dedupe, close-code policy, fallback and state) are small
// exported pure functions and classes so they can be unit tested without a network.

export const VERSION = "1.0.0";

/** Connection states, as exposed by `bus.state` and `onStateChange`. */
export const State = Object.freeze({
  CONNECTING: "connecting", // never connected yet
  LIVE: "live", // events arrive live: WebSocket open and authenticated, or an SSE stream that answered
  RECONNECTING: "reconnecting", // lost the connection; retrying (polling not working either)
  POLLING: "polling", // neither WebSocket nor SSE can connect; events arrive by HTTP polling
  OFFLINE: "offline", // the browser is offline, or bus.close() was called
});

/** WebSocket close codes of the protocol (mirrors CloseCode in schemas/protocol.py). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  PROTOCOL_ERROR: 1002,
  INVALID_DATA: 1007,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  AUTH_FAILED: 4001,
  TOKEN_EXPIRED: 4002,
  TOKEN_REVOKED: 4003,
  SLOW_CONSUMER: 4008,
  TOO_MANY_ERRORS: 4009,
  TOO_MANY_REQUESTS: 4029,
});

export const DEFAULTS = Object.freeze({
  backoff: Object.freeze({ initial: 1000, max: 30000, factor: 2, jitter: 0.2 }),
  // A connection that stayed up this long resets the backoff: a flapping gateway keeps the delays
  // growing, a healthy one that restarts once is retried after about a second.
  stableAfter: 10000,
  pollInterval: 10000,
  // A poll not answered in this time is abandoned (and the round counts as failed): a gateway
  // answers within its subscribe timeout (5 s) even when Redis hangs, but a proxy or a dead
  // network may hold the request open forever, and polling would stop with it.
  pollTimeout: 30000,
  // Failed WebSocket attempts (never reaching "live") before falling back (to SSE, else polling).
  // One: a page behind a proxy that blocks WebSocket should not wait for a second backoff round.
  pollAfterFailures: 1,
  // Server-Sent Events as the first fallback (false: straight to polling).
  sse: true,
  // An SSE stream silent this long (the gateway sends a comment every 15 s) is dropped and reopened.
  sseIdleTimeout: 45000,
  // Application-level ping: detects a half-open connection (laptop sleep, NAT timeout) that the
  // browser would otherwise only notice after minutes.
  pingInterval: 25000,
  pongTimeout: 10000,
  // A handshake, a token function, and the gateway's answer to a subscribe (from when it was
  // sent, pushed back by every part of an answer; see EventBus._checkAnswers) take at most this
  // long. Above the gateway's --subscribe-timeout (5 s), which bounds its own wait for Redis.
  connectTimeout: 10000,
  // An onResync not settled after this long is reported (resync_slow), once per call: the
  // project's events are held until it settles (never applied to stale state), and a reload
  // whose fetch never ends would otherwise hold them in silence.
  resyncSlowAfter: 30000,
  // "Prompt" reconnects (gateway draining with 1012, slow consumer 4008, expired token) still get a
  // little jitter so that thousands of clients closed at once do not arrive in the same millisecond.
  promptDelayMax: 500,
  // At most one `activity` frame per project per this many ms: the latest state is sent when it
  // passes (the first change after a quiet while goes at once). Others see presence change at
  // most once a second (the gateway's presence_diff), so faster frames would show nothing sooner;
  // at one a second a page changing its activity in 10 projects all the time uses half the
  // gateway's default rate limit (20 frames/s), and past that the pacing below takes over.
  activityInterval: 1000,
  // Frames refused by the gateway's rate limit (`rate_limited`) are sent again, in order, from
  // the time it names (retry_after_ms; else backoff.initial), this many ms apart, doubled each
  // time one of them is refused again (at most backoff.max): see FramePacer.
  resendInterval: 100,
});

// ----------------------------------------------------------------------------------------------
// Pure logic (exported for unit tests)
// ----------------------------------------------------------------------------------------------

/**
 * Delay before reconnect attempt number `attempt` (0-based): initial * factor^attempt, spread by
 * +/- jitter, and always within [initial, max] (1 s .. 30 s by default).
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const { initial, max, factor, jitter } = { ...DEFAULTS.backoff, ...options };
  const raw = Math.min(max, initial * Math.pow(factor, Math.max(0, attempt)));
  const spread = raw * jitter * (2 * random() - 1);
  return Math.round(Math.min(max, Math.max(initial, raw + spread)));
}

/** Stateful wrapper of backoffDelay: `next()` grows the delay, `reset()` starts over. */
export class Backoff {
  constructor(options = {}, random = Math.random) {
    this.options = { ...DEFAULTS.backoff, ...options };
    this.random = random;
    this.attempt = 0;
  }

  next() {
    const delay = backoffDelay(this.attempt, this.options, this.random);
    // Capped so that factor^attempt never overflows to Infinity on a page left open for weeks.
    this.attempt = Math.min(this.attempt + 1, 60);
    return delay;
  }

  reset() {
    this.attempt = 0;
  }
}

/**
 * What to do when the WebSocket closes with `code` (docs/protocol.md, "Close codes").
 * Returns {delay: "prompt" | "backoff", renewToken, clientBug}. Every code reconnects: a
 * dashboard must never give up, and the codes that signal a client bug are reported via onError.
 */
export function closeAction(code) {
  switch (code) {
    case CloseCode.GOING_AWAY:
    case CloseCode.SERVICE_RESTART:
    case CloseCode.SLOW_CONSUMER:
      // The gateway is draining or dropped us for reading too slowly: resume at once (on another
      // pod); the cursor guarantees nothing is lost.
      return { delay: "prompt", renewToken: false, clientBug: false };
    case CloseCode.TOKEN_EXPIRED:
      // A new token fixes it; no reason to wait.
      return { delay: "prompt", renewToken: true, clientBug: false };
    case CloseCode.AUTH_FAILED:
    case CloseCode.TOKEN_REVOKED:
      // A fresh token may fix it (after a revocation, one minted now is accepted if the person
      // still has access), but a token endpoint that keeps minting refused tokens must not be
      // hammered: back off.
      return { delay: "backoff", renewToken: true, clientBug: false };
    case CloseCode.PROTOCOL_ERROR:
    case CloseCode.INVALID_DATA:
    case CloseCode.POLICY_VIOLATION:
    case CloseCode.MESSAGE_TOO_BIG:
    case CloseCode.TOO_MANY_ERRORS:
    case CloseCode.TOO_MANY_REQUESTS: // kept sending while the gateway's rate limit refused frames
      return { delay: "backoff", renewToken: false, clientBug: true };
    default:
      // 1000 from the server, 1006 (refused, reset), 1011, 1013 (a pod that cannot check tokens
      // yet) and anything unknown.
      return { delay: "backoff", renewToken: false, clientBug: false };
  }
}

/** Whether to poll over HTTP: WebSocket unsupported, or it failed `threshold` times in a row. */
export function shouldPoll({ websocketSupported, failuresSinceLive, threshold = DEFAULTS.pollAfterFailures }) {
  return !websocketSupported || failuresSinceLive >= threshold;
}

/**
 * The health of the WebSocket rung of the transport ladder, across its attempts: the decisions of
 * when to fall back (SSE, else polling), how long to wait before the next attempt, whether a
 * close may be resumed at once, and whether a connection counted as a success. Pure: times are
 * the caller's clock (ms), passed in; the attempts themselves are the caller's.
 *
 * `backoff` (a Backoff) is the reconnect delay's; `stableAfter` (ms) how long a proven connection
 * stays up to reset it; `pollAfterFailures` the failed attempts in a row that send the client to
 * the fallbacks.
 */
export class SocketHealth {
  constructor({ stableAfter = DEFAULTS.stableAfter, pollAfterFailures = DEFAULTS.pollAfterFailures, backoff = new Backoff() } = {}) {
    this.stableAfter = stableAfter;
    this.pollAfterFailures = pollAfterFailures;
    this.backoff = backoff;
    // WebSocket attempts that failed (never got live, or ended before stable: see
    // EventBus._onSocketClosed) since the last one that proved useful (`proven`).
    this.failures = 0;
    // The WebSocket has answered every subscribe sent on it since it got live (or had none to
    // answer): only then does it count as a success (failures back to 0, polling stopped), and
    // only a proven one is stable. A gateway that authenticates and drops each connection
    // before answering would otherwise keep the client "reconnecting" for ever, nothing polled.
    this.proven = false;
    // A prompt reconnect was made since the last stable WebSocket (the next one waits for the backoff).
    this.prompted = false;
    this.attemptAt = null; // when the last attempt started (attempting)
    this.liveAt = null; // when the last connection got live (live)
  }

  /** An attempt starts at `now`. */
  attempting(now) {
    this.attemptAt = now;
  }

  /** While the browser says it is offline, an attempt goes at most once per `max` ms (see
   * EventBus._connect): null when one may go at `now`, else how long to wait first (a clock set
   * back since the last attempt: `max`, not the step too). */
  offlineWait(now, max) {
    const since = this.attemptAt === null ? max : now - this.attemptAt;
    return since < max ? Math.min(max, max - since) : null;
  }

  /** The connection got live at `now`: not proven yet. */
  live(now) {
    this.proven = false;
    this.liveAt = now;
  }

  /** The live connection answered every subscribe sent on it: a success, the failures cleared.
   * Returns whether it was not proven before (the caller acts once per connection). */
  prove() {
    if (this.proven) return false;
    this.proven = true;
    this.failures = 0;
    return true;
  }

  /** The connection is gone (closed, dropped): the next one proves itself again. */
  ended() {
    this.proven = false;
  }

  /** What the connection ending at `now` was, read before `ended()`: `proven` (it was live and
   * answered), `stable` (proven, not given up on for not answering, and up for stableAfter).
   * Nothing changes: see wasStable. */
  closedOutcome(now, { wasLive, gaveUp }) {
    const proven = wasLive && this.proven;
    const stable = proven && !gaveUp && now - this.liveAt >= this.stableAfter;
    return { proven, stable };
  }

  /** The connection that ended was stable: the backoff starts over, and a prompt reconnect may be
   * made again. */
  wasStable() {
    this.backoff.reset();
    this.prompted = false;
  }

  /** Takes the one prompt reconnect allowed until a connection is stable: true (and taken) if
   * not taken yet, false when the next attempt waits for the backoff. */
  takePrompt() {
    if (this.prompted) return false;
    this.prompted = true;
    return true;
  }

  /** An attempt ended: it counts as failed unless `spared`. */
  attemptFailed({ spared = false } = {}) {
    if (!spared) this.failures += 1;
  }

  /** Whether the attempts have failed often enough to use the fallbacks (SSE, else polling). */
  shouldFallBack() {
    return shouldPoll({ websocketSupported: true, failuresSinceLive: this.failures, threshold: this.pollAfterFailures });
  }

  /** The delay before the next attempt (the backoff, grown by each call). */
  reconnectDelay() {
    return this.backoff.next();
  }

  /** The backoff starts over (the network came back: the next attempt goes soon). */
  resetBackoff() {
    this.backoff.reset();
  }
}

/**
 * The health of the SSE rung of the transport ladder, across its streams: when the next stream
 * opens after one ended (at once for a planned reopen, promptly for a close asking to resume,
 * else on the backoff, polling meanwhile), and whether a stream that ended was stable. Unlike the
 * WebSocket's (SocketHealth), failed streams are not counted: polling carries the events after
 * each one that could not open or broke. Pure: times are the caller's clock (ms), passed in; the
 * streams themselves are the caller's.
 *
 * `backoff` (a Backoff) is the delay's before the next stream; `stableAfter` (ms) how long a
 * stream that answered stays open to reset it.
 */
export class SseHealth {
  constructor({ stableAfter = DEFAULTS.stableAfter, backoff = new Backoff() } = {}) {
    this.stableAfter = stableAfter;
    this.backoff = backoff;
    // A prompt reconnect was made since the last stable stream (the next one waits for the
    // backoff).
    this.prompted = false;
  }

  /** Whether the stream ending at `now` was stable: it answered (`proven`), was not given up on
   * for not answering a subscribe (`gaveUp`: up, not stable, the backoff keeps growing), and was
   * open (since `openedAt`; null: it never opened, not stable) for stableAfter. Nothing changes:
   * see wasStable. */
  isStable(now, { proven, openedAt, gaveUp }) {
    return proven && !gaveUp && openedAt !== null && now - openedAt >= this.stableAfter;
  }

  /** The stream that ended was stable: the backoff starts over, and a prompt reconnect may be
   * made again. */
  wasStable() {
    this.backoff.reset();
    this.prompted = false;
  }

  /**
   * How the next stream opens after one ended (the client not closed, no WebSocket live), from
   * what the one that ended was: `{open: "reopen"}` at once when it was a planned `reopen` (other
   * projects, a gap, a token about to expire); `{open: "prompt"}` when it was `live` and the
   * gateway closed it with a `closeCode` asking to resume at once (draining, slow consumer, token
   * expired), the one prompt reconnect allowed until a stream is stable (taken); else
   * `{open: "backoff", delay}`: it could not open, or broke, and the next one goes after `delay`
   * ms, the backoff (grown by the call) or the refusal's `retryAfter` (ms) when that is longer.
   */
  nextStream({ reopen, live, closeCode, retryAfter = 0 }) {
    if (reopen) return { open: "reopen" };
    if (live && closeCode !== null && closeAction(closeCode).delay === "prompt" && !this.prompted) {
      this.prompted = true;
      return { open: "prompt" };
    }
    return { open: "backoff", delay: Math.max(this.backoff.next(), retryAfter || 0) };
  }

  /** The backoff starts over (the network came back: the next stream goes soon). */
  resetBackoff() {
    this.backoff.reset();
  }
}

/** The user-visible state, derived from the transport facts. */
export function computeState({ closed, online, websocketLive, sseLive = false, pollingOk, everConnected }) {
  if (closed) return State.OFFLINE;
  if (websocketLive || sseLive) return State.LIVE;
  // A poll answered shows the network is there, whatever navigator.onLine says.
  if (pollingOk) return State.POLLING;
  if (!online) return State.OFFLINE;
  return everConnected ? State.RECONNECTING : State.CONNECTING;
}

/** Decode the claims of a JWT without verifying it (only to learn iat/exp), or null. */
export function decodeTokenClaims(token) {
  try {
    const part = String(token).split(".")[1];
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const json = decodeURIComponent(
      Array.from(atob(padded), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""),
    );
    const claims = JSON.parse(json);
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/**
 * Milliseconds from `now` until the token obtained at `obtainedAt` should be refreshed, or null
 * when its lifetime is unknown. Uses the token's own lifetime (exp - iat) measured on the local
 * clock from when it was obtained, so a browser clock that is off by minutes does not matter;
 * refreshes a minute before expiry, or at 3/4 of the lifetime for short-lived tokens. At most
 * MAX_TIMER_DELAY (24.8 days): browsers take a longer setTimeout delay as 0, so a token living a
 * month was refreshed at once, and again after each refresh, for ever. Such a token is
 * refreshed early instead.
 */
export function refreshDelay({ iat, exp, expiresAt, obtainedAt, now }) {
  let expiry;
  if (Number.isFinite(iat) && Number.isFinite(exp) && exp > iat) {
    // iat is truncated to the second, so the token may have been minted up to 1 s after it.
    expiry = obtainedAt + (exp - iat) * 1000 - 1000;
  } else if (Number.isFinite(expiresAt ?? exp)) {
    expiry = (expiresAt ?? exp) * 1000; // server's clock; the best we have
    // Expired already when obtained, yet taken by the gateway: this clock is ahead of the
    // gateway's by an unknown amount, so the lifetime is unknown too. A refresh "due at once"
    // was made again after every refresh, twice a second for ever; instead none (the gateway
    // closes with 4002 at the expiry, and the reconnect takes a new token).
    if (expiry <= obtainedAt) return null;
  } else {
    return null;
  }
  const lifetime = Math.max(0, expiry - obtainedAt);
  const margin = Math.min(60000, lifetime / 4);
  return Math.min(MAX_TIMER_DELAY, Math.max(500, expiry - margin - now));
}

/** The longest delay setTimeout waits (2^31 - 1 ms); browsers run a longer one at once. */
const MAX_TIMER_DELAY = 2147483647;

/**
 * SHA-1 of `bytes` (a Uint8Array), as 40 lowercase hex digits. Synchronous and small on purpose:
 * crypto.subtle is asynchronous, and missing altogether on a page not served over https.
 */
export function sha1Hex(bytes) {
  const length = bytes.length;
  // The message, a 1 bit, zeros, and its length in bits (64-bit big-endian): whole 64-byte blocks.
  const words = new Int32Array((((length + 8) >> 6) + 1) * 16);
  for (let i = 0; i < length; i += 1) words[i >> 2] |= bytes[i] << (24 - (i & 3) * 8);
  words[length >> 2] |= 0x80 << (24 - (length & 3) * 8);
  words[words.length - 2] = Math.floor(length / 0x20000000);
  words[words.length - 1] = (length * 8) >>> 0;
  const w = new Int32Array(80);
  let h0 = 0x67452301;
  let h1 = 0xefcdab89 | 0;
  let h2 = 0x98badcfe | 0;
  let h3 = 0x10325476;
  let h4 = 0xc3d2e1f0 | 0;
  for (let block = 0; block < words.length; block += 16) {
    for (let t = 0; t < 16; t += 1) w[t] = words[block + t];
    for (let t = 16; t < 80; t += 1) {
      const x = w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16];
      w[t] = (x << 1) | (x >>> 31);
    }
    let a = h0;
    let b = h1;
    let c = h2;
    let d = h3;
    let e = h4;
    for (let t = 0; t < 80; t += 1) {
      let f;
      let k;
      if (t < 20) {
        f = (b & c) | (~b & d);
        k = 0x5a827999;
      } else if (t < 40) {
        f = b ^ c ^ d;
        k = 0x6ed9eba1;
      } else if (t < 60) {
        f = (b & c) | (b & d) | (c & d);
        k = 0x8f1bbcdc | 0;
      } else {
        f = b ^ c ^ d;
        k = 0xca62c1d6 | 0;
      }
      const next = (((a << 5) | (a >>> 27)) + f + e + k + w[t]) | 0;
      e = d;
      d = c;
      c = (b << 30) | (b >>> 2);
      b = a;
      a = next;
    }
    h0 = (h0 + a) | 0;
    h1 = (h1 + b) | 0;
    h2 = (h2 + c) | 0;
    h3 = (h3 + d) | 0;
    h4 = (h4 + e) | 0;
  }
  return [h0, h1, h2, h3, h4].map((h) => (h >>> 0).toString(16).padStart(8, "0")).join("");
}

/**
 * The tag of an event (docs/protocol.md, "Cursor tags"): the first 16 hex digits of SHA-1 over
 * the UTF-8 bytes of its JSON text exactly as received (never a re-serialization).
 */
export function eventTag(text) {
  return sha1Hex(new TextEncoder().encode(text)).slice(0, 16);
}

const TAG = /^[0-9a-f]{16}$/;

/** The `tag` of a message or cursor when it is a well-formed tag, else null (absent: unchecked). */
function tagOf(value) {
  const tag = value && typeof value === "object" ? value.tag : null;
  return typeof tag === "string" && TAG.test(tag) ? tag : null;
}

/** Whether two tags of one cursor name different events: both known, and not equal. */
function tagsDiffer(own, named) {
  return own !== null && named !== null && own !== named;
}

/** Where the tag of an event accepted by a ProjectCursor comes from: {text} (its JSON text as
 * received, hashed only when a cursor needs it) or {tag} (a poll page's, for its last event). */
const eventOrigins = new WeakMap();

function originTag(event) {
  const origin = eventOrigins.get(event);
  if (!origin) return null;
  if (origin.tag === undefined) {
    origin.tag = eventTag(origin.text);
    origin.text = null;
  }
  return origin.tag;
}

/**
 * The WHATWG event-stream parser, fed decoded text as it arrives (chunks may split lines, and a
 * CRLF). `feed(text)` returns the events completed: {event ("message" when unnamed), data, id}.
 */
export class SseParser {
  constructor() {
    this.pending = []; // the pieces of a line not ended yet
    this.pendingLength = 0;
    this.data = [];
    this.dataLength = 0;
    this.event = "";
    this.lastId = null;
    this.skipLf = false;
    this.lines = 0; // lines completed so far: a stream's sign of life (a keepalive is one)
  }

  /** Throws when the event being read (its data and the line not ended yet) grows past
   * SseParser.MAX_EVENT_LENGTH characters: a stream that never ends a line or an event must not
   * hold memory without bound. Each chunk is scanned once, however it splits lines. */
  feed(text) {
    const events = [];
    let start = 0;
    for (;;) {
      if (this.skipLf && start < text.length) {
        if (text[start] === "\n") start += 1;
        this.skipLf = false;
      }
      LINE_END.lastIndex = start;
      const match = LINE_END.exec(text);
      if (match === null) break;
      let end = match.index;
      let line = text.slice(start, end);
      if (this.pending.length) {
        line = this.pending.join("") + line;
        this.pending = [];
        this.pendingLength = 0;
      }
      if (text[end] === "\r") {
        if (end + 1 >= text.length) this.skipLf = true;
        else if (text[end + 1] === "\n") end += 1;
      }
      start = end + 1;
      this.lines += 1;
      this._line(line, events);
    }
    if (start < text.length) {
      this.pending.push(text.slice(start));
      this.pendingLength += text.length - start;
    }
    if (this.pendingLength + this.dataLength > SseParser.MAX_EVENT_LENGTH) {
      throw new Error(`eventbus: an SSE event longer than ${SseParser.MAX_EVENT_LENGTH} characters`);
    }
    return events;
  }

  _line(line, events) {
    if (line === "") {
      if (this.data.length) events.push({ event: this.event || "message", data: this.data.join("\n"), id: this.lastId });
      this.data = [];
      this.dataLength = 0;
      this.event = "";
      return;
    }
    if (line[0] === ":") return; // a comment: the gateway's keepalive
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (name === "data") {
      this.data.push(value);
      this.dataLength += value.length + 1;
    }
    else if (name === "event") this.event = value;
    else if (name === "id" && !value.includes("\0")) this.lastId = value;
  }
}

const LINE_END = /[\r\n]/g;

/** The longest SSE event accepted, in characters: an event frame is at most 1 MiB
 * (schemas/stored.py), a presence list of 1,000 members far less. */
SseParser.MAX_EVENT_LENGTH = 4 * 1024 * 1024;

/**
 * The SSE request for `cursors` ([[projectId, {epoch, seq, tag?} | null], ...]): its path and its
 * Last-Event-ID (null when no project has a cursor). One project: `/v1/projects/{id}/stream` and
 * `<epoch>:<seq>`; several: `/v1/stream?project=..` and `<id>=<epoch>:<seq>,...` (docs/protocol.md).
 * A cursor with a tag is `<epoch>:<seq>:<tag>`. With `presence`, the stream also carries presence
 * messages (`presence=1`). With `partial`, a stream of several projects goes on for the others when
 * one project's subscription fails (`partial=1`: the client polls that one; docs/protocol.md).
 */
export function sseRequest(cursors, { presence = false, partial = false } = {}) {
  const known = cursors.filter(([, cursor]) => cursor);
  const id = (cursor) => {
    const tag = tagOf(cursor);
    return `${cursor.epoch}:${cursor.seq}${tag !== null ? `:${tag}` : ""}`;
  };
  if (cursors.length === 1) {
    const [projectId, cursor] = cursors[0];
    return {
      path: `/v1/projects/${projectId}/stream${presence ? "?presence=1" : ""}`,
      lastEventId: cursor ? id(cursor) : null,
    };
  }
  const path = "/v1/stream?" + cursors.map(([projectId]) => `project=${projectId}`).join("&") + (presence ? "&presence=1" : "") + (partial ? "&partial=1" : "");
  const lastEventId = known.length
    ? known
        .sort((a, b) => a[0] - b[0])
        .map(([projectId, cursor]) => `${projectId}=${id(cursor)}`)
        .join(",")
    : null;
  return { path, lastEventId };
}

/**
 * Where the tag of an SSE event `item` (the parsed `message`) comes from: its data as received,
 * unless it spans lines. The gateway writes a frame holding a CR or LF (JSON whitespace) as
 * two `data` lines (its later CRs and LFs as tabs), which a parser joins with LF: its bytes
 * are not at hand, and their hash
 * would be another event's tag (a spurious history_lost on the next resume). Then the tag is
 * the one the gateway wrote in the event's `id` for this project at this seq (of the bytes it
 * holds), else unknown (unchecked rather than wrong).
 */
function sseOrigin(item, message) {
  if (!item.data.includes("\n")) return { text: item.data };
  const id = typeof item.id === "string" ? item.id : "";
  // `<epoch>:<seq>:<tag>`, or `<project>=<epoch>:<seq>:<tag>,...` for a stream of several.
  const part = id.includes("=") ? id.split(",").find((entry) => entry.startsWith(`${message.project_id}=`)) : id;
  const [, seq, tag] = (part ? part.slice(part.indexOf("=") + 1) : "").split(":");
  return seq === String(message.seq) && TAG.test(tag ?? "") ? { tag } : null;
}

/**
 * The cursor of one project and the ordering rules: deduplicate by seq, deliver in order, detect
 * gaps, and hold events back while the application reloads its state. The cursor is
 * (epoch, seq, tag): the tag names the event at seq (docs/protocol.md, "Cursor tags"), null when
 * unknown; the text of the last event applied is kept and hashed only when the tag is asked for.
 */
export class ProjectCursor {
  constructor() {
    this.epoch = null;
    this.seq = null;
    this.at = null; // where the tag of the event at seq comes from: {text} or {tag}; null: unknown
    this.resyncing = false;
    this.generation = 0; // bumps on every resync, so a stale onResync completion is recognisable
    this.buffer = [];
    this.heldSeqs = new Set();
    this.overflow = false;
    this.resyncSinceSubscribe = false;
    // The last resync since the last subscribe was a live resync_required: {epoch, seq} it named,
    // and whether a snapshot moved the cursor since (else only it and live events did); null:
    // none (or the subscribe's own answer).
    this.liveResync = null;
    this.askAgain = false;
  }

  get known() {
    return this.epoch !== null;
  }

  /** The tag of the event at seq, or null when unknown (hashed now if it was not yet). */
  get tag() {
    if (this.at === null) return null;
    if (this.at.tag === undefined) this.at = { tag: eventTag(this.at.text) };
    return this.at.tag;
  }

  /** The gateway names the tag of the event at (epoch, seq) (a `subscribed`, a poll page): kept
   * when the cursor stands there and has none (e.g. a snapshot's cursor without one). */
  learnTag(epoch, seq, tag) {
    if (tag !== null && this.at === null && this.known && epoch === this.epoch && seq === this.seq) this.at = { tag };
  }

  /**
   * A resume from the cursor goes out (a subscribe, a new SSE stream): its answer is judged
   * afresh (onSubscribed), and the events held back while the application reloads are dropped.
   * The gateway replays everything after the cursor again (or says resync_required), and a held
   * event of the connection before may be one a failover has replaced since: the resume's tag
   * names the cursor's event, not the held ones, so the replacement would be taken for a
   * duplicate of the lost event and never delivered. (A poll asks after what is held, with the
   * tag of the last held event: the gateway checks that one.)
   */
  resume() {
    this.resyncSinceSubscribe = false;
    this.liveResync = null;
    this._clearBuffer();
    this.overflow = false; // (the gap it stands for is asked for by this resume)
  }

  /** The subscribe frame: resume after the cursor when there is one (with its tag, if known). */
  subscribeMessage(projectId) {
    this.resume();
    const message = { type: "subscribe", project_id: projectId };
    if (this.known) {
      message.epoch = this.epoch;
      message.after = this.seq;
      const tag = this.tag;
      if (tag !== null) message.tag = tag;
    }
    return message;
  }

  /** Query string of the polling endpoint: after the cursor, or after what is already held
   * back while the application reloads (so a slow reload does not fetch the same page again);
   * with the tag of the event it names when known and `tags` (not to a gateway that refused one). */
  pollQuery({ tags = true } = {}) {
    if (!this.known) return "";
    let after = this.seq;
    let held = null;
    for (const event of this.buffer) {
      if (event.seq > after) {
        after = event.seq;
        held = event;
      }
    }
    const tag = !tags ? null : held !== null ? originTag(held) : this.tag;
    return `?epoch=${encodeURIComponent(this.epoch)}&after=${after}${tag !== null ? `&tag=${tag}` : ""}`;
  }

  /** Start a reload: later events continue after (epoch, seq) (the event there tagged `tag`, or
   * unknown); anything buffered is obsolete. `live`: a resync_required of the live feed, maybe
   * ahead of the answer to a subscribe already sent (see onSubscribed). */
  beginResync(epoch, seq, tag = null, { live = false } = {}) {
    this.liveResync = live ? { epoch, seq, snapshotMoved: false } : null;
    this.epoch = epoch;
    this.seq = seq;
    this.at = tag !== null ? { tag } : null;
    this.resyncing = true;
    this.generation += 1;
    this._clearBuffer();
    this.overflow = false;
    this.resyncSinceSubscribe = true;
  }

  /**
   * Whether a `resync_required` says `too_far_behind` of this very cursor: the gateway handles a
   * resubscribe (a gap's repair) after the messages before it, the project's live events (the
   * next ones, delivered) keep coming meanwhile, and it then finds more than one replay between
   * the cursor it was sent and its top, which is where this cursor already stands. Nothing is
   * missing: it is taken as the subscribe's answer (its `subscribed` follows), not a reload.
   * Unless its tag names another event at that seq than the cursor's (a failover replaced the
   * one applied): the replacement would never come, and a resume from a later event never tell.
   */
  atTop(message) {
    const { reason, epoch, seq } = message;
    if (reason !== "too_far_behind" || this.resyncing || !this.known) return false;
    if (epoch !== this.epoch || seq !== this.seq) return false;
    const tag = tagOf(message);
    if (tagsDiffer(this.tag, tag)) return false;
    this.learnTag(epoch, seq, tag);
    this.resyncSinceSubscribe = true; // (so its `subscribed`, not resumed, is no reload either)
    this.liveResync = null;
    return true;
  }

  /**
   * The gateway's `subscribed`. Returns true when the application must reload its state: first
   * subscribe, or a resume the gateway did not honour without saying resync_required first
   * (not `resumed`, another epoch, or a top behind the cursor: the events up to the cursor of
   * that history would otherwise be dropped as duplicates of the ones already applied; or a
   * top at the cursor tagged as another event: live events took the cursor there while the
   * subscribe was handled, and a failover replaced the one applied, whose replacement would
   * never come). After a resync_required since the subscribe it is that resync's answer and
   * ignored, unless the resync came from the live feed ahead of this answer and the answer names
   * another epoch or a top behind where that resync and the live events after it took the
   * cursor: the history moved back again (a second failover lost those events too), and the
   * next events under those numbers would be dropped as duplicates. A snapshot that moved the
   * cursor may be ahead of the gateway (docs/browser.md): then only the resync's own position
   * counts.
   */
  onSubscribed(message) {
    const { epoch, seq, resumed } = message;
    const tag = tagOf(message);
    if (!this.known) {
      this.beginResync(epoch, seq, tag);
      return true;
    }
    if (this.resyncSinceSubscribe) {
      const live = this.liveResync;
      const own = live === null || live.snapshotMoved ? live : this; // (the snapshot's may be ahead)
      if (own === null || (epoch === own.epoch && seq >= own.seq)) return false; // resync_required came first and was handled
      this.beginResync(epoch, seq, tag);
      return true;
    }
    const replaced = seq === this.seq && tagsDiffer(this.tag, tag);
    if (resumed !== true || epoch !== this.epoch || seq < this.seq || replaced) {
      this.beginResync(epoch, seq, tag);
      return true;
    }
    this.learnTag(epoch, seq, tag);
    return false;
  }

  /** An event frame. Returns {deliver: events to hand to the application now, gap}. `origin`
   * gives its tag: {text} (the JSON text it arrived as) or {tag} (a poll page's); else unknown. */
  accept(event, origin = null) {
    if (origin) eventOrigins.set(event, { ...origin });
    if (this.resyncing || !this.known) {
      // Held back, once per seq, and bounded: a reload that keeps failing must not grow memory
      // without end. Past the bound the held events are dropped and the gap is reported when
      // the reload ends (the client then resumes from its cursor, so nothing is lost).
      if (this.overflow || (this.known && event.seq <= this.seq)) return { deliver: [], gap: false };
      if (this.heldSeqs.has(event.seq)) return { deliver: [], gap: false };
      if (this.buffer.length >= ProjectCursor.MAX_BUFFERED) {
        this._clearBuffer();
        this.overflow = true;
        return { deliver: [], gap: false };
      }
      this.buffer.push(event);
      this.heldSeqs.add(event.seq);
      return { deliver: [], gap: false };
    }
    return this._apply([event]);
  }

  /**
   * The application's reloaded state includes every event up to `snapshot` ({epoch, seq}, e.g.
   * from publisher.outbox's snapshot helper): continue exactly after it. In the same epoch the
   * cursor moves to the later of the two (held or late events at or before the snapshot are
   * dropped as already applied; a snapshot older than the cursor leaves a gap that endResync
   * reports, so the events in between are asked for again). Another epoch: the cursor becomes
   * the snapshot's and the events after it are asked for (the gateway answers resync_required
   * if it cannot honour it). Call between beginResync and endResync.
   */
  adoptSnapshot(snapshot) {
    const { epoch, seq } = snapshot;
    // The tag of the event the snapshot ends with: its own, else a held event's there (the same
    // event the gateway sent), else unknown (unchecked).
    let tag = tagOf(snapshot);
    if (this.liveResync !== null && (epoch !== this.epoch || seq !== this.seq)) this.liveResync.snapshotMoved = true;
    if (epoch !== this.epoch) {
      this.epoch = epoch;
      this._clearBuffer(); // held events are of the other epoch
      this.askAgain = true;
    } else if (seq < this.seq) {
      this.askAgain = true; // (seq, this.seq] is neither in the snapshot nor held
    } else if (seq === this.seq) {
      if (tag !== null) this.at = { tag };
      return;
    } else if (tag === null) {
      const held = this.buffer.find((event) => event.seq === seq);
      if (held) tag = originTag(held);
    }
    this.seq = seq;
    this.at = tag !== null ? { tag } : null;
  }

  /** The application finished reloading: apply what arrived meanwhile (seq > cursor only). */
  endResync() {
    this.resyncing = false;
    const buffered = this.buffer.sort((a, b) => a.seq - b.seq);
    this._clearBuffer();
    const askAgain = this.askAgain;
    this.askAgain = false;
    if (this.overflow) {
      this.overflow = false;
      return { deliver: [], gap: true };
    }
    const result = this._apply(buffered);
    // A snapshot behind the resync point or of another epoch: what follows it is not held (a
    // held event after the gap stops _apply), so ask for it from the new cursor.
    if (askAgain && result.deliver.length === 0) result.gap = true;
    return result;
  }

  _clearBuffer() {
    this.buffer = [];
    this.heldSeqs = new Set();
  }

  _apply(events) {
    const deliver = [];
    for (const event of events) {
      if (event.seq <= this.seq) continue; // duplicate (replay overlap, polling/WebSocket switch)
      if (event.seq !== this.seq + 1) return { deliver, gap: true }; // never skip silently
      this.seq = event.seq;
      this.at = eventOrigins.get(event) || null;
      deliver.push(event);
    }
    return { deliver, gap: false };
  }
}

/**
 * The connection-wide pacing of frames after the gateway's rate limit refused one
 * (docs/protocol.md, "Rate limit"; docs/browser.md). The gateway counts every frame of a
 * connection in one bucket, so retries per project that each wait their own delay arrive
 * together when many projects were refused together, and are refused again: each refusal a
 * strike towards the close (4029). Instead the connection keeps one "not before" instant and one
 * queue of held frames:
 *
 * - `refused(now, retryAfterMs)`: nothing goes out before `now + retryAfterMs` (the gateway's
 *   `retry_after_ms`: when its bucket holds a token again; capped at maxSpacing; absent from an
 *   old gateway: max(fallbackDelay, spacing)). If a held frame went out since the last refusal
 *   and a refusal still came, the spacing doubles (at most maxSpacing): the gateway's rate is
 *   lower than this pace.
 * - `mayDirect(now)`: a frame may go out at once only when nothing is held and no refusal asks
 *   to wait; else the caller `hold`s it, under a key (`subscribe:<id>`, `activity:<id>`,
 *   `auth`): a key already held keeps its place and takes the new item (the frame is built
 *   when it goes out, so it is the latest: the cursor now, the activity now).
 * - `next(now)` gives the first held item once due; `resent(now)` after sending it makes the
 *   next one wait `spacing`. When the queue empties the spacing starts over.
 *
 * Bounded: at most one item per key (a few per project). Times are the caller's clock (ms): the
 * page's is the wall clock, which the system may step back (NTP, the user); a `now` earlier than
 * one seen before moves the "not before" back by as much, so a step never adds its size to a wait.
 */
export class FramePacer {
  constructor({ spacing = DEFAULTS.resendInterval, maxSpacing = DEFAULTS.backoff.max, fallbackDelay = DEFAULTS.backoff.initial } = {}) {
    this.initialSpacing = Math.max(1, spacing);
    this.maxSpacing = Math.max(this.initialSpacing, maxSpacing);
    this.fallbackDelay = fallbackDelay;
    this.reset();
  }

  /** A new connection: a new bucket on the gateway, nothing held. */
  reset() {
    this.notBefore = -Infinity;
    this.seen = -Infinity; // the latest `now` given
    this.spacing = this.initialSpacing;
    this.queue = new Map();
    this.resentSinceRefusal = false;
  }

  get held() {
    return this.queue.size;
  }

  /** The caller's clock at `now`: stepped back since the last call, the wait keeps its length. */
  _observe(now) {
    if (now < this.seen) this.notBefore -= this.seen - now;
    this.seen = now;
  }

  mayDirect(now) {
    this._observe(now);
    return this.queue.size === 0 && now >= this.notBefore;
  }

  refused(now, retryAfterMs) {
    this._observe(now);
    if (this.resentSinceRefusal) this.spacing = Math.min(this.spacing * 2, this.maxSpacing);
    this.resentSinceRefusal = false;
    const named = typeof retryAfterMs === "number" && Number.isFinite(retryAfterMs) && retryAfterMs >= 0;
    const wait = named ? Math.min(retryAfterMs, this.maxSpacing) : Math.max(this.fallbackDelay, this.spacing);
    this.notBefore = Math.max(this.notBefore, now + wait);
  }

  hold(key, item) {
    this.queue.set(key, item); // (a key already held keeps its place in a Map)
  }

  drop(key) {
    this.queue.delete(key);
  }

  /** When the first held item is due (null: nothing held); `now`, when given, is observed. */
  dueAt(now) {
    if (now !== undefined) this._observe(now);
    return this.queue.size ? this.notBefore : null;
  }

  next(now) {
    this._observe(now);
    if (this.queue.size === 0 || now < this.notBefore) return null;
    const [key, item] = this.queue.entries().next().value;
    this.queue.delete(key);
    return item;
  }

  resent(now) {
    this._observe(now);
    this.notBefore = now + this.spacing;
    this.resentSinceRefusal = true;
    if (this.queue.size === 0) this.spacing = this.initialSpacing;
  }
}

/** The SSE events that answer for a project of the stream (when they name one): the first makes
 * the stream live (see EventBus._proveSse). Not `error`: one naming a project says its
 * subscription failed, and the gateway ends the stream after it (close 1011): nothing flows. */
const SSE_ANSWERS = new Set(["message", "subscribed", "resync_required"]);

/** Where a project's cursor stands (epoch, seq, and which reload): whether it moved. */
function cursorMark(cursor) {
  return `${cursor.generation}:${cursor.epoch}:${cursor.seq}`;
}

/** Bytes of a line still arriving that keep an SSE stream alive for another sseIdleTimeout. */
const SSE_PROGRESS_BYTES = 16 * 1024;

/** The longest pong timeout (in pongTimeouts) after connections dropped for unanswered pings,
 * and the longest bound on a subscribe's answer (in connectTimeouts) after connections given
 * up on for one. */
const STRETCH_MAX = 16;

/**
 * A bound on a wait (a pong, a subscribe's answer), in multiples of its configured length, that
 * stretches after waits given up on and shrinks back (the client keeps one per kind of wait and
 * connection). A reply slower to arrive than the bound (a big frame over a slow link: it counts
 * only once complete) was cut at the same bound each time and came as slowly again, for ever; so
 * each give-up doubles the stretch (at most `max`), and a wait met within the configured length
 * puts it back to 1. With `decayAfter` (ms) it also halves for every decayAfter without a
 * give-up, down to 1: a give-up long ago says little of a wait now.
 *
 * Times are the caller's clock (ms): the page's is the wall clock, which the system may step back
 * (NTP, the user); a `now` earlier than the last give-up (or halving) counts the period from
 * `now`, so the stretch waits one period, not the step too.
 */
export class StretchedBound {
  constructor({ max = STRETCH_MAX, decayAfter = Infinity } = {}) {
    this.max = max;
    this.decayAfter = decayAfter;
    this.stretch = 1;
    this.stretchedAt = null; // the last give-up (or halving)
  }

  /** The stretch for a wait starting at `now` (decayed, see decayAfter); at least 1. */
  factor(now) {
    const at = this.stretchedAt;
    if (this.stretch <= 1 || at === null) return this.stretch;
    // (A clock set back: counted from now, so the stretch waits one period, not the step too.)
    if (now < at) this.stretchedAt = now;
    const halvings = Math.floor(Math.max(0, now - at) / this.decayAfter);
    if (halvings > 0) {
      this.stretch = Math.max(1, this.stretch / Math.pow(2, halvings));
      this.stretchedAt = at + halvings * this.decayAfter;
    }
    return this.stretch;
  }

  /** A wait that took stretch `taken` (by default the stretch as it is) was given up on at `now`:
   * the next waits twice as long, at most `max` (and at least 1). */
  gaveUp(now, taken = this.stretch) {
    this.stretch = Math.max(1, Math.min(taken * 2, this.max));
    this.stretchedAt = now;
  }

  /** A wait was met within the configured length: the bound is back to it. */
  answeredInTime() {
    this.stretch = 1;
  }
}

/** Repairs of a gap from one cursor before it is surfaced as a resync (history_corrupt). */
const GAP_REPAIRS = 2;

/** Events held back per project while the application reloads its state. */
ProjectCursor.MAX_BUFFERED = 10000;

/** The gateway's page size when a poll gives no `limit` (docs/protocol.md, "Polling"). */
const DEFAULT_POLL_LIMIT = 100;

/** The protocol's epoch (docs/protocol.md): 1 to 64 of [A-Za-z0-9_-]. */
const EPOCH = /^[A-Za-z0-9_-]{1,64}$/;

/** Whether `value` is a cursor {epoch, seq: integer >= 0} the gateway can resume from: a
 * subscribe from an epoch of another form is refused (invalid_cursor) on every connection, so a
 * project that took one (a snapshot cursor) would never be subscribed again. */
export function isCursor(value) {
  return (
    !!value &&
    typeof value === "object" &&
    typeof value.epoch === "string" &&
    EPOCH.test(value.epoch) &&
    Number.isSafeInteger(value.seq) &&
    value.seq >= 0
  );
}

/** Whether `body` is an answer of the polling endpoint (docs/protocol.md, "Polling"): a cursor
 * (of the resync when there is one) and events that each have a seq. Anything else would move
 * the cursor somewhere meaningless, or stop polling with a TypeError. */
function isPollAnswer(body) {
  if (!body || typeof body !== "object") return false;
  if (body.resync_required) return isCursor(body.resync_required);
  if (!isCursor(body)) return false;
  const events = body.events ?? [];
  return Array.isArray(events) && events.every((event) => !!event && typeof event === "object" && Number.isSafeInteger(event.seq));
}

function isMember(value) {
  return !!value && typeof value === "object" && typeof value.id === "string";
}

/** Whether `message` is a well-formed `presence` (members: an array of {id: string, ...}) or
 * `presence_diff` (joined and changed: such arrays; left: an array of ids). */
function isPresenceMessage(message) {
  if (message.type === "presence") return Array.isArray(message.members) && message.members.every(isMember);
  const { joined, left, changed } = message;
  return (
    Array.isArray(joined) &&
    joined.every(isMember) &&
    Array.isArray(changed) &&
    changed.every(isMember) &&
    Array.isArray(left) &&
    left.every((id) => typeof id === "string")
  );
}

/**
 * One project's members as the gateway announces them (docs/presence.md): `load` a `presence`
 * message's list, `apply` each `presence_diff` (remove `left`, then put `joined` and `changed`).
 */
export class PresenceTable {
  constructor() {
    this.members = new Map();
  }

  load(members) {
    this.members = new Map();
    for (const member of Array.isArray(members) ? members : []) if (member && typeof member.id === "string") this.members.set(member.id, member);
  }

  /** Apply a diff; returns the change {joined, left, changed}. */
  apply(diff) {
    const joined = Array.isArray(diff.joined) ? diff.joined : [];
    const left = Array.isArray(diff.left) ? diff.left : [];
    const changed = Array.isArray(diff.changed) ? diff.changed : [];
    for (const id of left) this.members.delete(id);
    for (const member of [...joined, ...changed]) if (member && typeof member.id === "string") this.members.set(member.id, member);
    return { joined, left, changed };
  }

  /** Every member, sorted by id. */
  list() {
    return Array.from(this.members.values()).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }
}

/** The message of a thrown value for onError. Never throws itself: String() of an object without
 * a prototype does, and it would escape the catch block that reports it (stopping delivery to the
 * other handlers with the cursor already past the event, or a reload loop for good). */
function describe(error) {
  try {
    return String(error);
  } catch {
    return "a thrown value that cannot be converted to a string";
  }
}

/**
 * The body of `response` as JSON, read as a stream and given up (the stream cancelled) as soon as
 * it grows past `limit` characters: an answer without end must not hold memory without bound.
 * Without a streaming body (old browsers) the text is read whole and checked afterwards.
 */
async function readJson(response, limit) {
  const tooLong = () => Object.assign(new Error(`eventbus: the gateway's answer is longer than ${limit} characters`), { tooLong: true });
  const body = response.body;
  if (!body || typeof body.getReader !== "function" || typeof TextDecoder !== "function") {
    const text = await response.text();
    if (text.length > limit) throw tooLong();
    return JSON.parse(text);
  }
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parts = [];
  let length = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const text = decoder.decode(value, { stream: true });
      length += text.length;
      if (length > limit) throw tooLong();
      parts.push(text);
    }
  } catch (error) {
    reader.cancel().catch(() => {});
    throw error;
  }
  parts.push(decoder.decode());
  return JSON.parse(parts.join(""));
}

/** The `message` of a refused request's JSON body (bounded), or "". */
/**
 * The wait a refused request was asked for, in ms: its `Retry-After` in seconds (the gateway
 * sends it with every 503: 1 while it drains, 5 while it is full or Redis is slow; it exposes
 * the header to pages), at most `max`; 0 without one, or for an HTTP date (not sent).
 */
export function retryAfterDelay(response, max) {
  const header = response && response.headers && typeof response.headers.get === "function" ? response.headers.get("Retry-After") : null;
  if (typeof header !== "string" || !/^\s*\d{1,9}(\.\d+)?\s*$/.test(header)) return 0;
  return Math.min(Math.round(Number(header) * 1000), max);
}

async function errorDetail(response) {
  try {
    const body = await readJson(response, 64 * 1024);
    return (body && typeof body.message === "string" && body.message) || "";
  } catch {
    return ""; // not JSON, or too long
  }
}

/** The subscribes of connection `conn` not answered yet (none), its clock from `progressAt`. */
function answersOf(conn, kind, progressAt, stretch) {
  return { conn, kind, stretch, asked: new Map(), progressAt, timer: null, seenAt: progressAt, slow: false };
}

function checkItemId(value, name) {
  if (value === undefined || value === null) return null;
  if (!Number.isSafeInteger(value) || value <= 0) throw new TypeError(`eventbus: ${name} must be a positive integer or null`);
  return value;
}

// --- options -----------------------------------------------------------------------------------

/** The longest pongTimeout and connectTimeout: the waits they bound stretch up to STRETCH_MAX
 * times (StretchedBound), and a stretched wait must still be a delay setTimeout honours. */
const MAX_STRETCHED_DELAY = Math.floor(MAX_TIMER_DELAY / STRETCH_MAX);

/** How a value is shown in an option's error: a string quoted (`"1000"` is not 1000). */
function shown(value) {
  if (typeof value === "string") return JSON.stringify(value.length > 80 ? `${value.slice(0, 80)}...` : value);
  if (typeof value === "function") return "a function";
  if (Array.isArray(value)) return "an array";
  if (value !== null && typeof value === "object") return "an object";
  return String(value);
}

/** The check of a number of milliseconds from `min` to `max` (both included). */
function millis(min, max = MAX_TIMER_DELAY) {
  return {
    expects: `a number of milliseconds from ${min} to ${max}`,
    type: (value) => typeof value === "number",
    range: (value) => value >= min && value <= max, // (false for NaN)
  };
}

const FUNCTION = { expects: "a function", type: (value) => typeof value === "function" };
const FLAG = { expects: "true or false", type: (value) => typeof value === "boolean" };
// A URL object too, as the WebSocket constructor and fetch take one (used as its text); one of
// another frame (an iframe's URL: another realm, not `instanceof URL` here) by its tag.
const URL_STRING = {
  expects: "a non-empty string or a URL",
  type: (value) =>
    (typeof value === "string" && value !== "") ||
    (typeof URL !== "undefined" && value instanceof URL) ||
    (value !== null && typeof value === "object" && Object.prototype.toString.call(value) === "[object URL]"),
};

/**
 * What each option of `connect()` takes, by name (none other exists): `type` (a TypeError when it
 * fails) and `range` (a RangeError), `expects` for the message. The bounds come from how each is
 * used: a delay setTimeout runs at once (over MAX_TIMER_DELAY, NaN) or a zero one that repeats
 * would retry in a tight loop against the gateway, so every timer's option is at most
 * MAX_TIMER_DELAY and the repeating ones at least 1 ms; only a one-off wait or a comparison may be 0.
 */
const OPTION_CHECKS = {
  url: URL_STRING,
  httpUrl: URL_STRING,
  // null or absent: no token (a --no-auth gateway). An empty string would be sent as
  // "Bearer " and refused (4001) on every attempt.
  // A promise of one too: awaited as a function's answer is (_getToken), a fixed token after.
  token: {
    expects: "a non-empty string, a function returning one (or a promise of one), or null",
    type: (value) =>
      value === null ||
      typeof value === "function" ||
      (typeof value === "string" && value !== "") ||
      (typeof value === "object" && typeof value.then === "function"),
  },
  onResync: FUNCTION,
  onStateChange: FUNCTION,
  onError: FUNCTION,
  backoff: { expects: "an object {initial, max, factor, jitter}", type: (value) => value !== null && typeof value === "object" && !Array.isArray(value) },
  stableAfter: millis(0), // a comparison: 0 counts every proven connection as stable
  pollInterval: millis(1),
  pollTimeout: millis(1),
  // Infinity: never fall back while WebSocket is supported (WebSocket only, retried for ever).
  pollAfterFailures: {
    expects: "a whole number from 1 up, or Infinity (never fall back)",
    type: (value) => typeof value === "number",
    range: (value) => value === Infinity || (Number.isInteger(value) && value >= 1),
  },
  websocket: FLAG,
  sse: FLAG,
  sseIdleTimeout: millis(1),
  pingInterval: millis(1),
  pongTimeout: millis(1, MAX_STRETCHED_DELAY),
  connectTimeout: millis(1, MAX_STRETCHED_DELAY),
  resyncSlowAfter: millis(1),
  promptDelayMax: millis(0), // a one-off jitter: 0 reconnects promptly at once
  activityInterval: millis(0), // 0: every activity change goes at once, unpaced
  resendInterval: millis(1),
  // null: no WebSocket (as `websocket: false`).
  WebSocket: { expects: "a constructor or null", type: (value) => value === null || typeof value === "function" },
  fetch: FUNCTION,
  setTimeout: FUNCTION,
  clearTimeout: FUNCTION,
  now: FUNCTION,
  random: FUNCTION,
  isOnline: FUNCTION,
};

const BACKOFF_CHECKS = {
  initial: millis(1),
  max: null, // from backoff.initial: checked with it below
  factor: { expects: "a finite number of at least 1", type: (value) => typeof value === "number", range: (value) => Number.isFinite(value) && value >= 1 },
  jitter: { expects: "a number from 0 to 1", type: (value) => typeof value === "number", range: (value) => value >= 0 && value <= 1 },
};

/**
 * The options a page could always leave out with any false value: the client read them as
 * `o.url || default`, `o.fetch || default`, `if (o.onError)`, so `onError: props.onError ?? null`,
 * `onStateChange: debug && log` or `url: env.GATEWAY_URL || ""` (same host) worked, and must go
 * on working: null, false, "", 0 there are not given. The flags `websocket` and `sse` took only
 * `false` as off: null is their default. Not `token` nor `WebSocket`, whose null means something
 * (no token, no WebSocket), nor the numbers: null there was a timer of 0, a tight loop.
 */
const FALSY_IS_DEFAULT = new Set(["url", "httpUrl", "onResync", "onStateChange", "onError", "backoff", "fetch", "setTimeout", "clearTimeout", "now", "random", "isOnline"]);
const NULL_IS_DEFAULT = new Set(["websocket", "sse"]);

/** Whether option `name` given as `value` is one not given: undefined, or one of the above. */
function notGiven(name, value) {
  return value === undefined || (!value && FALSY_IS_DEFAULT.has(name)) || (value === null && NULL_IS_DEFAULT.has(name));
}

/** `object`'s own properties that are given (`isNotGiven(name, value)` false; by default, not
 * undefined). */
function givenOf(object, isNotGiven = (name, value) => value === undefined) {
  return Object.fromEntries(Object.entries(object).filter(([name, value]) => !isNotGiven(name, value)));
}

function checkValue(name, check, value, given) {
  const fails = !check.type(value) ? TypeError : check.range && !check.range(value) ? RangeError : null;
  if (fails) throw new fails(`eventbus: ${name} must be ${check.expects}, got ${shown(value)}${given ? "" : " (the default)"}`);
}

/** The number of single-character edits (insert, delete, replace) from `a` to `b`. */
function editDistance(a, b) {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i += 1) {
    const row = [i];
    for (let j = 1; j <= b.length; j += 1) row.push(Math.min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1)));
    previous = row;
  }
  return previous[b.length];
}

/** Unknown names are refused: a misspelt option (`pingIntreval`) would otherwise be ignored,
 * its default used in silence. The message names the closest known one. */
function checkNames(given, checks, prefix) {
  for (const name of Object.keys(given)) {
    if (Object.prototype.hasOwnProperty.call(checks, name)) continue;
    const known = Object.keys(checks);
    const distance = (candidate) => editDistance(name.toLowerCase(), candidate.toLowerCase());
    const closest = known.reduce((best, candidate) => (distance(candidate) < distance(best) ? candidate : best));
    // A slip is a few edits, fewer in a short name: `foo` is no misspelling of `now`.
    const slip = distance(closest) <= Math.max(1, Math.floor(name.length / 3));
    const hint = slip ? `did you mean ${prefix}${closest}?` : `the options are ${prefix}${known.join(`, ${prefix}`)}`;
    throw new TypeError(`eventbus: unknown option ${prefix}${name} (${hint})`);
  }
}

/**
 * The options of `connect()` (`new EventBus`) with the defaults filled in (DEFAULTS; `backoff`
 * merged with DEFAULTS.backoff), after checking them all, so that a bad value fails at once with
 * an error naming it instead of later in silence (a browser runs a timer of NaN, or over
 * 2^31 - 1 ms, at once: a tight reconnect or polling loop). Throws a TypeError for an unknown
 * name or a value of the wrong type, a RangeError for a number out of its bounds (see
 * OPTION_CHECKS; backoff.max is at least backoff.initial). An option given as undefined is one
 * not given, and so is a false one (null, "") where that was always the default (notGiven).
 * Pure: reads nothing but `options`.
 */
export function checkOptions(options = {}) {
  if (options === null || typeof options !== "object" || Array.isArray(options)) {
    throw new TypeError(`eventbus: the options must be an object, got ${shown(options)}`);
  }
  const given = givenOf(options, notGiven);
  checkNames(given, OPTION_CHECKS, "");
  for (const [name, value] of Object.entries(given)) checkValue(name, OPTION_CHECKS[name], value, true);
  const backoffGiven = givenOf(given.backoff || {});
  checkNames(backoffGiven, BACKOFF_CHECKS, "backoff.");
  const merged = { ...DEFAULTS, ...given, backoff: { ...DEFAULTS.backoff, ...backoffGiven } };
  for (const [name, check] of Object.entries(BACKOFF_CHECKS)) {
    if (check) checkValue(`backoff.${name}`, check, merged.backoff[name], name in backoffGiven);
  }
  const { initial, max } = merged.backoff;
  const maxCheck = { ...millis(initial), expects: `a number of milliseconds from backoff.initial (${initial}) to ${MAX_TIMER_DELAY}` };
  checkValue("backoff.max", maxCheck, max, "max" in backoffGiven);
  return merged;
}

// ----------------------------------------------------------------------------------------------
// The client
// ----------------------------------------------------------------------------------------------

function defaultHttpUrl(url) {
  const parsed = new URL(url, typeof location !== "undefined" ? location.href : undefined);
  parsed.protocol = parsed.protocol === "wss:" ? "https:" : "http:";
  return parsed.origin;
}

function defaultWebSocketUrl() {
  if (typeof location === "undefined") throw new Error("eventbus: `url` is required");
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
}

class Subscription {
  constructor(projectId) {
    this.projectId = projectId;
    this.handlers = new Set();
    this.presenceHandlers = new Set();
    this.presence = null; // a PresenceTable once the gateway sent `presence`
    this.cursor = new ProjectCursor();
    this.resyncRunning = false;
    this.retryTimer = null;
    this.resyncWait = null; // {timer, resolve}: a failed onResync waiting to be called again
    // Gap repairs (EventBus._onGap): one at a time, paced, at most GAP_REPAIRS from one cursor.
    this.gapWaiting = false; // a repair's subscribe (or stream) was sent; its `subscribed` is due
    this.gapTimer = null; // a paced repair
    this.gapFrom = null; // "epoch:seq" of the cursor the repairs were made from
    this.gapRepairs = 0; // repairs made from it
    this.gapBackoff = null;
    this.lastRepairAt = null;
    this.wsSubscribed = false; // `subscribed` received on the current WebSocket
    this.staleSnapshots = 0; // snapshot cursors in a row of another epoch than the gateway's
    this.pollLimit = null; // the `limit` of this project's polls after an answer too long
    // Moves of the cursor by the fallbacks (events delivered, a reload begun by a poll answer or
    // an SSE frame), and their count when the last subscribe went out on the WebSocket (see
    // answersStaleSubscribe). Both may deliver after it went out: polling runs until the
    // WebSocket has answered every subscribe, and an SSE stream until the WebSocket is
    // authenticated (its subscribes go out with the token).
    this.fallbackMoves = 0;
    this.wsAskedFallbackMoves = 0;
    this.subscribesSent = 0; // subscribes sent on the current WebSocket and not answered yet
    // Whether each of them asked presence, oldest first (taken off as they are answered): the
    // answer `subscribed` of one that did is followed by `presence`, or by error `unavailable`
    // when only the presence read failed (presenceDue).
    this.presenceAsks = [];
    // `subscribed` came for a subscribe that asked presence, and neither its `presence` nor the
    // error saying presence is unavailable yet: the gateway answers a project's frames in
    // order, so an `unavailable` of the project now is that presence read's, not a refusal.
    this.presenceDue = false;
    this.presenceRetry = 0; // presence reads failed since the last `presence` (its re-asks' backoff)
    // Its subscription failed (refused, or ended by the gateway: `unavailable` naming it) on the
    // SSE streams in a row since its last `subscribed` on one: the backoff of the reopens trying
    // it live again (EventBus._sseSubscriptionFailed).
    this.sseFailures = 0;
    // The current WebSocket refused the project's subscribe for its subscription limit
    // (`too_many_subscriptions`): polling carries it while that connection lives, or until a
    // slot the page freed on it subscribes it again (EventBus._offerFreedSlot).
    this.refusedForLimit = false;
    this.refusedForLimitAt = 0; // the order of that refusal among the connection's (oldest first)
    this.slotOffered = false; // subscribed again for a freed slot, its answer not come yet
    // The place among the refusals of the same project refused, dropped and added back in one
    // run (EventBus._keepFreedSlot): its next refusal takes it (0: none).
    this.refusalKept = 0;
    // Polls of the project wait for the answer to its subscribe sent again after a stale one
    // (EventBus._holdPollsOf): the timer ending the wait after connectTimeout; null: not held.
    this.pollHoldTimer = null;
    this.activitySent = null; // the activity value last sent on the current WebSocket
    this.activitySentAt = null; // when an activity frame of the project last went out
    this.activityTimer = null; // the latest activity, due activityInterval after the last one
  }

  get idle() {
    return this.handlers.size === 0 && this.presenceHandlers.size === 0;
  }

  /**
   * Whether a frame of this project on the WebSocket answers a subscribe that went out before
   * polling or an SSE stream (see fallbackMoves) moved the cursor: that answer is for the
   * cursor left behind, and judged against the one they reached it would mislead (EventBus._onEvent,
   * _onResyncRequired, _onSubscribed). `final`: the frame is a `subscribed`, which answers a
   * subscribe whatever the count of unanswered ones says (the caller has taken its own off the
   * count already, and a rate-limit refusal may have been taken for it, _onRateLimited). Any
   * other frame (an event, a `resync_required`) may also come live, when no subscribe is
   * unanswered: it is an answer only while one is.
   */
  answersStaleSubscribe({ final = false } = {}) {
    return (final || this.subscribesSent > 0) && this.wsAskedFallbackMoves !== this.fallbackMoves;
  }
}

export class EventBus {
  constructor(options = {}) {
    // Checked once, here: a bad value throws now, naming the option (checkOptions).
    this.options = checkOptions(options);
    const o = this.options;
    this.url = o.url ? String(o.url) : defaultWebSocketUrl();
    this.httpUrl = (o.httpUrl ? String(o.httpUrl) : defaultHttpUrl(this.url)).replace(/\/+$/, "");
    // `websocket: false` configures WebSocket off (SSE, else polling, from the start).
    this._WebSocket = o.websocket === false ? null : "WebSocket" in o ? o.WebSocket : globalThis.WebSocket;
    this._fetch = o.fetch || (globalThis.fetch ? globalThis.fetch.bind(globalThis) : null);
    this._setTimeout = o.setTimeout || globalThis.setTimeout.bind(globalThis);
    this._clearTimeout = o.clearTimeout || globalThis.clearTimeout.bind(globalThis);
    this._now = o.now || (() => Date.now());
    this._random = o.random || Math.random;
    this._isOnline = o.isOnline || (() => typeof navigator === "undefined" || navigator.onLine !== false);

    this._subs = new Map();
    this._limitRefusals = 0; // refusals for the subscription limit so far (their order)
    // Projects the page dropped in the current task, each freeing a slot on the connection that
    // is offered once the task is over (_slotFreedByPage), and whether that offer is queued.
    this._slotsFreed = [];
    this._slotOfferQueued = false;
    // projectId -> place among the refusals (refusedForLimitAt) of a project refused for the
    // limit that the page dropped in the current task: added back, it keeps it (_keepFreedSlot).
    this._refusalsDropped = new Map();
    // projectId -> unsubscribes sent on the current WebSocket and not answered yet: an
    // `unsubscribed` answering none is the gateway's own (_onUnsubscribed).
    this._unsubscribesDue = new Map();
    // The project of the last frame of the WebSocket when it was error `forbidden` (else null):
    // an `unsubscribed` right after it is the gateway's own (_onUnsubscribed).
    this._forbiddenLast = null;
    this._activity = new Map(); // projectId -> {viewing, answering}, this tab's latest
    // The WebSocket rung's failures, proof, backoff and prompt reconnect (see SocketHealth).
    this._wsHealth = new SocketHealth({
      stableAfter: o.stableAfter,
      pollAfterFailures: o.pollAfterFailures,
      backoff: new Backoff(o.backoff, this._random),
    });
    this._state = State.CONNECTING;
    this._closed = false;
    this._everConnected = false;
    this._ws = null;
    this._wsLive = false;
    // Frames may go on the WebSocket: it is open and its `auth` sent (live comes with `authenticated`).
    this._wsOpen = false;
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    // The pong timeout of the next pings, in pongTimeouts: doubled (at most STRETCH_MAX)
    // after each connection dropped for an unanswered ping, back to 1 once a ping is answered
    // within pongTimeout. A frame slower to arrive than the timeout (a big event over a slow
    // link) holds the pong behind it, and the browser shows no sign of its bytes: cut, the
    // connection resumed and the same frame was replayed as slowly, for ever. (No decay: a
    // link is taken as slow until a ping shows otherwise.)
    this._pongBound = new StretchedBound();
    this._pingSentAt = null;
    this._connectTimer = null;
    this._refreshTimer = null;
    this._refreshSent = false; // a token refresh (`auth`) is sent and not answered yet
    // The subscribes not answered yet, per connection (the WebSocket, an SSE stream): conn ->
    // {conn, kind: "websocket" or "sse", asked: Map projectId -> {sub, at}, progressAt, timer, seenAt, slow: one was answered
    // later than connectTimeout} (_checkAnswers). One per connection: a WebSocket attempt opens
    // (its subscribes sent) while an SSE stream is live, and whichever fails, the other's bound
    // stays armed.
    this._answers = new Map();
    // The bound on those answers, in connectTimeouts, per kind of connection: doubled (at most
    // STRETCH_MAX) after each connection of that kind given up on for an unanswered subscribe,
    // back to 1 once every subscribe of one is answered within connectTimeout. A replayed event
    // slower to arrive than the bound (a big one over a slow link: it pushes the bound back only
    // once complete) was cut, and replayed as slowly. Per kind: SSE streams held by a buffering
    // proxy say nothing of how soon the gateway answers a WebSocket subscribe (nor the other way
    // round), and a stuck one would be waited on up to STRETCH_MAX times as long. The stretch
    // also halves for every `decayAfter` without a give-up of that kind (_stretchOf): a kind
    // given up on long ago (a WebSocket before a long SSE period) says nothing of a subscribe now.
    // decayAfter is twice the longest time from a give-up to the next connection of that kind
    // asking (the backoff, at most backoff.max, then a token and a handshake, connectTimeout
    // each). A link slow enough to be given up on meets the doubled bound at its next connection;
    // one not given up on for that long is waited on as recent evidence says, not up to
    // STRETCH_MAX connectTimeouts for ever.
    const decayAfter = 2 * (o.backoff.max + 2 * o.connectTimeout);
    this._answerBounds = { websocket: new StretchedBound({ decayAfter }), sse: new StretchedBound({ decayAfter }) };
    // Frames refused by the gateway's rate limit, and those sent after them, go out paced
    // (FramePacer): one "not before" and one queue for the whole WebSocket.
    this._pacer = new FramePacer({ spacing: o.resendInterval, maxSpacing: o.backoff.max, fallbackDelay: o.backoff.initial });
    this._pacerTimer = null;
    this._gaveUp = null; // the connection given up on for not answering (not a stable one)
    this._token = null; // {value, obtainedAt}
    this._tokenPromise = null;
    this._polling = false;
    this._pollOk = false;
    this._pollTimer = null;
    this._pollDeferred = false; // polling started, its first round put off (_startPolling's delay)
    this._pollGeneration = 0;
    this._pollAbort = null; // the AbortController of the poll request under way
    this._pollRunning = false;
    this._pollAgain = false;
    this._pollRetryAfter = 0; // the Retry-After of this round's refusal, in ms (0: none)
    // Until when (this._now()) the gateway asked polls to wait: a round refused with Retry-After
    // sets it, and every round, asked for at once or not, waits for it (_pollWait).
    this._pollNotBefore = -Infinity;
    this._pollClockSeen = -Infinity; // the latest this._now() _pollWait saw
    this._sse = null; // the SSE attempt in progress or open: {controller, live, closeCode, reopen}
    this._sseLive = false;
    // The SSE rung's backoff, stable streams and prompt reconnect (see SseHealth).
    this._sseHealth = new SseHealth({ stableAfter: o.stableAfter, backoff: new Backoff(o.backoff, this._random) });
    this._sseRetryTimer = null;
    this._sseRefreshTimer = null;
    // The last stream answered, but for a cursor polling had moved meanwhile (_proveSse): the
    // next one holds polls until it answers, for this long at most (ms; 0: it holds none). A
    // planned reopen passes on what is left of it (see _connectSse).
    this._nextStreamHold = 0;
    // Streams reopened for a failed presence read or a failed subscription in a row, since a
    // stream read every presence it asked and subscribed every project (or the WebSocket took
    // over): the reopens' own backoff (see _ssePresenceFailed, _sseSubscriptionFailed).
    this._ssePresenceReopens = 0;
    this._reportedTransport = null;
    // A gateway refused a poll or SSE resume that carried a tag (400: one from before cursor
    // tags, after a rollback): those go without tags until a gateway shows it knows them.
    this._tagsRefused = false;
    this._partialRefused = false; // the last stream's gateway refused ?partial=1 (see _connectSse)
    this.nextRetryAt = null;
    this.lastError = null;

    if (typeof addEventListener === "function" && !o.isOnline) {
      this._onOnline = () => this._handleOnline();
      this._onOffline = () => this._handleOffline();
      addEventListener("online", this._onOnline);
      addEventListener("offline", this._onOffline);
    }
    // Deferred so that subscribe() calls right after connect() go out with the first connection.
    Promise.resolve().then(() => this._connect());
  }

  /** Current state: "connecting" | "live" | "reconnecting" | "polling" | "offline". */
  get state() {
    return this._state;
  }

  /** "websocket", "sse", "polling" or null: how events currently arrive. */
  get transport() {
    if (this._wsLive) return "websocket";
    if (this._sseLive) return "sse";
    return this._polling && this._pollOk ? "polling" : null;
  }

  /** The cursor {epoch, seq, tag?} of a subscribed project (null before its first `subscribed`);
   * `tag` (of the event at seq) only when known. */
  cursor(projectId) {
    const sub = this._subs.get(projectId);
    if (!sub || !sub.cursor.known) return null;
    const cursor = { epoch: sub.cursor.epoch, seq: sub.cursor.seq };
    const tag = sub.cursor.tag;
    if (tag !== null) cursor.tag = tag;
    return cursor;
  }

  /**
   * Receive the events of `projectId`, in order, once each. Returns a function that unsubscribes
   * this handler (the project is unsubscribed when its last handler goes).
   */
  subscribe(projectId, onEvent) {
    if (!Number.isSafeInteger(projectId) || projectId <= 0) {
      throw new TypeError("eventbus: projectId must be a positive integer");
    }
    if (typeof onEvent !== "function") throw new TypeError("eventbus: onEvent must be a function");
    if (this._closed) throw new Error("eventbus: subscribe() after close()");
    let sub = this._subs.get(projectId);
    if (!sub) {
      sub = new Subscription(projectId);
      this._subs.set(projectId, sub);
      this._keepFreedSlot(sub);
      // (On a WebSocket not yet live too: the gateway reads it after the token.)
      if (this._wsOpen) this._sendSubscribe(sub);
      if (this._wsLive) {
        /* nothing else carries events */
      } else if (this._sse) this._reopenSse(); // a stream's projects are fixed: open a new one
      else {
        if (this._polling) this._pollSoon();
        if (this._fallingBack()) this._fallBack();
      }
    }
    sub.handlers.add(onEvent);
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      sub.handlers.delete(onEvent);
      this._dropIfIdle(sub);
    };
  }

  _dropIfIdle(sub) {
    if (!sub.idle || this._subs.get(sub.projectId) !== sub) return;
    this._subs.delete(sub.projectId);
    this._clearTimers(sub);
    // Held frames of the project are moot; the unsubscribe goes at once (the gateway executes
    // it even over its rate limit, and takes nothing for it when it ends a subscription). A
    // project whose subscribe never reached the gateway (held by the pacing, or refused) has
    // nothing to leave: no unsubscribe, which would count against the limit.
    this._pacer.drop(`subscribe:${sub.projectId}`);
    this._pacer.drop(`activity:${sub.projectId}`);
    const onGateway = sub.wsSubscribed || sub.subscribesSent > 0;
    if (this._wsOpen && onGateway) {
      this._send({ type: "unsubscribe", project_id: sub.projectId });
      this._unsubscribesDue.set(sub.projectId, (this._unsubscribesDue.get(sub.projectId) || 0) + 1);
    }
    // The unsubscribe (sent first) frees the project's slot on the gateway; a project given a
    // freed slot whose subscribe never went out passes that slot on.
    if (this._wsLive && (onGateway || sub.slotOffered)) this._slotFreedByPage(sub.projectId);
    // Refused for the limit (or added back so in this task, its new refusal to come): added
    // back in this task, refused again, it keeps its place among the refused.
    const place = sub.refusedForLimit ? sub.refusedForLimitAt : sub.refusalKept;
    if (place && this._wsLive) {
      if (this._refusalsDropped.size === 0) Promise.resolve().then(() => this._refusalsDropped.clear());
      this._refusalsDropped.set(sub.projectId, place);
    }
    if (sub.refusedForLimit) this._pollRefusedOnly(); // (the last one polled: polling ends)
    if (!this._wsLive && this._sse) this._reopenSse();
  }

  /** A project is dropped (or the bus closed): none of its timers may stay pending. */
  _clearTimers(sub) {
    this._clearTimeout(sub.retryTimer);
    sub.retryTimer = null;
    this._clearTimeout(sub.gapTimer);
    sub.gapTimer = null;
    this._clearTimeout(sub.activityTimer);
    sub.activityTimer = null;
    this._releasePollsOf(sub);
    const wait = sub.resyncWait;
    sub.resyncWait = null;
    if (wait) {
      this._clearTimeout(wait.timer);
      wait.resolve(); // the reload loop sees the project gone and ends
    }
  }

  /** The project's subscribe frame, for a send now on the live WebSocket: its answer is due. */
  _subscribeMessage(sub) {
    const message = sub.cursor.subscribeMessage(sub.projectId);
    if (sub.presenceHandlers.size > 0) message.presence = true;
    sub.wsAskedFallbackMoves = sub.fallbackMoves;
    this._asking(this._ws, sub);
    sub.subscribesSent += 1;
    sub.presenceAsks.push(message.presence === true);
    return message;
  }

  /** The oldest unanswered subscribe of `sub` on the WebSocket is answered (`subscribed`, a
   * refusal): whether it asked presence. */
  _subscribeAnswered(sub) {
    sub.subscribesSent -= 1;
    return sub.presenceAsks.shift() === true;
  }

  /** Subscribe `sub` on the live WebSocket, now or (paced) later: the frame is made when it goes
   * out, from the cursor and presence listeners of then. */
  _sendSubscribe(sub) {
    this._sendPaced(`subscribe:${sub.projectId}`, () => (this._subs.get(sub.projectId) === sub ? this._subscribeMessage(sub) : null));
  }

  /**
   * Who is on the project's dashboards (docs/presence.md). `onChange(members, change)` is called
   * after every `presence` (change null) and `presence_diff` (change {joined, left, changed}),
   * with every member sorted by id, and once with `members` null when presence becomes
   * unavailable (fallen back to polling, offline, closed). Subscribes to the project like
   * subscribe() when nothing else did. Returns the function that removes this listener.
   */
  presence(projectId, onChange) {
    if (!Number.isSafeInteger(projectId) || projectId <= 0) {
      throw new TypeError("eventbus: projectId must be a positive integer");
    }
    if (typeof onChange !== "function") throw new TypeError("eventbus: onChange must be a function");
    if (this._closed) throw new Error("eventbus: presence() after close()");
    let sub = this._subs.get(projectId);
    const created = !sub;
    if (!sub) {
      sub = new Subscription(projectId);
      this._subs.set(projectId, sub);
      this._keepFreedSlot(sub);
    }
    const first = sub.presenceHandlers.size === 0;
    sub.presenceHandlers.add(onChange);
    if (created || first) {
      // A live project asks again from its cursor with the flag: the replay that follows is
      // handled like any resume (nothing lost, nothing twice).
      if (this._wsOpen) this._sendSubscribe(sub);
      if (this._wsLive) {
        /* nothing else carries events */
      } else if (this._sse) this._reopenSse();
      else if (created) {
        if (this._polling) this._pollSoon();
        if (this._fallingBack()) this._fallBack();
      }
    } else if (sub.presence) {
      this._notifyOne(sub, onChange, sub.presence.list(), null);
    }
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      sub.presenceHandlers.delete(onChange);
      if (sub.presenceHandlers.size > 0 || this._subs.get(projectId) !== sub) return;
      sub.presence = null;
      if (!sub.idle) {
        if (this._wsOpen) this._sendSubscribe(sub); // without the flag: no more diffs
        if (!this._wsLive && this._sse) this._reopenSse();
      }
      this._dropIfIdle(sub);
    };
  }

  /** The members of a project (sorted by id), or null while presence is unknown. */
  members(projectId) {
    const sub = this._subs.get(projectId);
    return sub && sub.presence ? sub.presence.list() : null;
  }

  /**
   * What this tab's person is doing in a project: `viewing` the item on screen, `answering` the
   * item being answered (positive integers, or null). Sent when the WebSocket is live and the
   * project subscribed: at once after a quiet while, else at most one frame per project per
   * `activityInterval` (1 s), carrying the latest state (call it on every mouse move if you
   * like); and again after every `subscribed` of it (a new connection starts with none). Kept
   * and sent later over SSE and polling, which cannot carry it.
   */
  activity(projectId, { viewing = null, answering = null } = {}) {
    if (!Number.isSafeInteger(projectId) || projectId <= 0) {
      throw new TypeError("eventbus: projectId must be a positive integer");
    }
    const value = { viewing: checkItemId(viewing, "viewing"), answering: checkItemId(answering, "answering") };
    const previous = this._activity.get(projectId);
    if (previous && previous.viewing === value.viewing && previous.answering === value.answering) return;
    this._activity.set(projectId, value);
    const sub = this._subs.get(projectId);
    if (sub && this._wsLive && sub.wsSubscribed) this._paceActivity(sub);
  }

  /** The project's activity changed: send it now, or when activityInterval has passed since the
   * last one (the latest then: changes in between are never sent). */
  _paceActivity(sub) {
    if (sub.activityTimer !== null) return; // due already: it will carry this change
    // At most activityInterval: a wall clock stepped back since the last frame must not hold
    // this one for the size of the step.
    const interval = this.options.activityInterval;
    const wait = sub.activitySentAt === null ? 0 : Math.min(interval, sub.activitySentAt + interval - this._now());
    if (wait <= 0) {
      this._sendActivity(sub);
      return;
    }
    sub.activityTimer = this._setTimeout(() => {
      sub.activityTimer = null;
      if (this._wsLive && this._subs.get(sub.projectId) === sub && sub.wsSubscribed) this._sendActivity(sub);
    }, wait);
  }

  /** Send the project's latest activity on the live WebSocket, now or (paced) later; nothing
   * when this WebSocket has it already, or the project is not subscribed on it (its
   * `subscribed` sends it). */
  _sendActivity(sub) {
    const projectId = sub.projectId;
    this._sendPaced(`activity:${projectId}`, () => {
      const value = this._activity.get(projectId);
      if (this._subs.get(projectId) !== sub || !sub.wsSubscribed || !value || value === sub.activitySent) return null;
      sub.activitySent = value;
      sub.activitySentAt = this._now();
      return { type: "activity", project_id: projectId, viewing: value.viewing, answering: value.answering };
    });
  }

  // --- pacing after rate_limited -----------------------------------------------------------------

  /** A frame the gateway's rate limit may refuse, made by `build()` (null: nothing to send any
   * more) now, or held under `key` while refused frames wait (FramePacer). */
  _sendPaced(key, build) {
    if (!this._wsOpen) return;
    if (this._pacer.mayDirect(this._now())) {
      const message = build();
      if (message) this._send(message);
      return;
    }
    this._pacer.hold(key, build);
    this._schedulePaced();
  }

  _schedulePaced() {
    if (this._pacerTimer !== null) return;
    const now = this._now();
    const due = this._pacer.dueAt(now);
    if (due === null) return;
    this._pacerTimer = this._setTimeout(() => {
      this._pacerTimer = null;
      this._sendHeld();
    }, Math.max(0, due - now));
  }

  /** The timer of the held frames: the first one due goes out (those with nothing left to send
   * are skipped), and the next is due `spacing` later. */
  _sendHeld() {
    if (!this._wsOpen) return;
    const now = this._now();
    for (;;) {
      const build = this._pacer.next(now);
      if (build === null) break;
      const message = build();
      if (message) {
        this._send(message);
        this._pacer.resent(now);
        break;
      }
    }
    this._schedulePaced();
  }

  /** `error` `rate_limited`: the frame was not executed. It is held and sent again when the
   * pacing allows, with everything sent after it. Which frame: the error's `refused` says (its
   * `type`). From a gateway that does not say, one naming a project is taken for its subscribe
   * when one is unanswered (the gateway answers a project's frames in order, and a
   * subscribe's answer is `subscribed` or an `error`), else for its activity (eventbus.js sends
   * no other frame naming a project that can be refused); one naming none, a token refresh.
   * Taken for an activity, it leaves the bound on a subscribe's answer alone: were it a
   * subscribe's after all, that bound would reconnect rather than leave the project silent. */
  _onRateLimited(message) {
    this._pacer.refused(this._now(), message.retry_after_ms);
    const projectId = message.project_id;
    const sub = projectId != null ? this._subs.get(projectId) : null;
    const refused = typeof message.refused === "string" ? message.refused : null;
    if (sub) {
      const subscribe = refused !== null ? refused === "subscribe" : sub.subscribesSent > 0;
      if (subscribe) {
        if (sub.subscribesSent > 0) this._subscribeAnswered(sub);
        this._answered(this._ws, projectId);
        this._sendSubscribe(sub);
      } else if (refused === null || refused === "activity") {
        sub.activitySent = null; // (not executed: the gateway has the one before)
        this._sendActivity(sub);
      }
    } else if (projectId == null && this._refreshSent && (refused === null || refused === "auth")) {
      this._refreshSent = false;
      this._sendPaced("auth", () => {
        if (!this._token) return null;
        this._refreshSent = true;
        return { type: "auth", token: this._token.value };
      });
    }
    this._schedulePaced();
  }

  _onPresence(message) {
    const sub = this._subs.get(message.project_id);
    if (sub && message.type === "presence") {
      sub.presenceDue = false; // (its read succeeded)
      sub.presenceRetry = 0;
    }
    if (!sub || sub.presenceHandlers.size === 0) return;
    if (!isPresenceMessage(message)) {
      // A buggy gateway: the frame is ignored (the list stays as it was), nothing else changes.
      this._reportError({ code: "invalid_frame", message: `gateway sent a malformed ${message.type}`, projectId: sub.projectId });
      return;
    }
    if (message.type === "presence") {
      sub.presence = sub.presence || new PresenceTable();
      sub.presence.load(message.members);
      this._notify(sub, null);
    } else if (sub.presence) {
      this._notify(sub, sub.presence.apply(message));
    }
  }

  _notify(sub, change) {
    const members = sub.presence ? sub.presence.list() : null;
    for (const handler of Array.from(sub.presenceHandlers)) this._notifyOne(sub, handler, members, change);
  }

  _notifyOne(sub, handler, members, change) {
    try {
      handler(members, change);
    } catch (error) {
      this._reportError({ code: "handler_failed", message: describe(error), projectId: sub.projectId, error });
    }
  }

  /** Presence is unknown now (polling, offline, closed): tell the listeners once. */
  _forgetPresence() {
    for (const sub of this._subs.values()) this._presenceUnknown(sub);
  }

  /** The project's presence is unknown now (a list it had is stale: no diff will come for it):
   * its listeners are told null, once (not again while it stays unknown). */
  _presenceUnknown(sub) {
    if (!sub.presence) return;
    sub.presence = null;
    this._notify(sub, null);
  }

  /** Reconnect now instead of waiting for the backoff (e.g. a "retry now" button). */
  reconnect() {
    if (this._closed || this._wsLive) return;
    this._clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._connect();
  }

  /** Close for good: no more reconnects, polls or events. */
  close() {
    if (this._closed) return;
    this._closed = true;
    for (const sub of this._subs.values()) this._clearTimers(sub);
    this._subs.clear();
    this._stopPolling();
    this._stopSse();
    for (const timer of ["_reconnectTimer", "_refreshTimer"]) {
      this._clearTimeout(this[timer]);
      this[timer] = null;
    }
    this._dropSocket(CloseCode.NORMAL, "client closed");
    if (this._onOnline) {
      removeEventListener("online", this._onOnline);
      removeEventListener("offline", this._onOffline);
    }
    this._updateState();
  }

  // --- tokens ----------------------------------------------------------------------------------

  get _hasAuth() {
    return this.options.token !== undefined && this.options.token !== null;
  }

  /** The token: asked again when `force` (every new connection) or when it is about to expire. */
  async _getToken(force) {
    const source = this.options.token;
    if (typeof source !== "function") return source;
    if (!force && this._token) {
      const claims = decodeTokenClaims(this._token.value);
      const delay = claims
        ? refreshDelay({ iat: claims.iat, exp: claims.exp, obtainedAt: this._token.obtainedAt, now: this._now() })
        : null;
      if (delay === null || delay > 500) return this._token.value;
    }
    // Concurrent callers (a poll and a reconnect) share one request to the token endpoint.
    if (!this._tokenPromise) {
      this._tokenPromise = (async () => {
        // Bounded: a token endpoint that never answers (a proxy holding the request) would
        // otherwise hold every later connect, stream and poll behind this shared promise.
        let timer = null;
        try {
          const value = await Promise.race([
            Promise.resolve().then(() => source()),
            new Promise((_, reject) => {
              timer = this._setTimeout(
                () => reject(new Error(`eventbus: the token function did not answer within ${this.options.connectTimeout} ms`)),
                this.options.connectTimeout,
              );
            }),
          ]);
          if (typeof value !== "string" || !value) throw new Error("eventbus: token function returned no token");
          this._token = { value, obtainedAt: this._now() };
          return value;
        } finally {
          this._clearTimeout(timer);
          this._tokenPromise = null;
        }
      })();
    }
    return this._tokenPromise;
  }

  _scheduleRefresh(message) {
    this._clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (typeof this.options.token !== "function" || !this._token) return; // a fixed token cannot be renewed
    const claims = decodeTokenClaims(this._token.value) || {};
    const delay = refreshDelay({
      iat: claims.iat,
      exp: claims.exp,
      expiresAt: message.expires_at,
      obtainedAt: this._token.obtainedAt,
      now: this._now(),
    });
    if (delay === null) return;
    this._refreshTimer = this._setTimeout(() => this._refreshToken(), delay);
  }

  async _refreshToken(attempt = 0) {
    const ws = this._ws;
    if (!ws || !this._wsLive) return;
    try {
      const token = await this._getToken(true);
      if (ws === this._ws && this._wsLive) {
        // Answered by `authenticated` (or, refused by the rate limit, sent again paced).
        this._sendPaced("auth", () => {
          this._refreshSent = true;
          return { type: "auth", token };
        });
      }
    } catch (error) {
      this._reportError({ code: "token_refresh_failed", message: describe(error), error });
      // Retry soon; if the token expires meanwhile the gateway closes with 4002 and we reconnect.
      this._refreshTimer = this._setTimeout(() => this._refreshToken(attempt + 1), backoffDelay(attempt, { max: 10000 }, this._random));
    }
  }

  // --- WebSocket -------------------------------------------------------------------------------

  async _connect() {
    if (this._closed || this._ws) return;
    this.nextRetryAt = null;
    if (typeof this._WebSocket !== "function") {
      // WebSocket unsupported or configured off: SSE, else polling.
      this._fallBack();
      this._updateState();
      return;
    }
    if (!this._isOnline()) {
      // The "online" event brings us back at once. navigator.onLine is not trusted for ever
      // (it says false on some machines with only a loopback, or behind some VPNs, while the
      // gateway is reachable): while it says offline, an attempt still goes, at most one per
      // backoff.max (the first at once). A real offline period costs that; a wrong onLine
      // cannot freeze the page. (The fallbacks are paced the same, _offlineDelay.)
      const wait = this._wsHealth.offlineWait(this._now(), this.options.backoff.max); // (a clock set back: max)
      if (wait !== null) {
        this._scheduleReconnect(wait);
        this._updateState();
        return;
      }
    }
    this._wsHealth.attempting(this._now());
    const attemptMarker = {};
    this._ws = attemptMarker; // claims the slot while the token is fetched
    let token = null;
    if (this._hasAuth) {
      try {
        token = await this._getToken(true);
      } catch (error) {
        this._reportError({ code: "token_failed", message: describe(error), error });
        if (this._ws === attemptMarker) this._ws = null;
        this._afterFailure(CloseCode.ABNORMAL);
        return;
      }
    }
    if (this._ws !== attemptMarker || this._closed) return;
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (error) {
      // A malformed URL or a Content-Security-Policy that forbids it: like a blocked WebSocket.
      this._reportError({ code: "websocket_failed", message: describe(error), error });
      this._ws = null;
      this._afterFailure(CloseCode.ABNORMAL);
      return;
    }
    this._ws = ws;
    this._connectTimer = this._setTimeout(() => {
      if (this._ws === ws && !this._wsLive) this._dropSocket(CloseCode.ABNORMAL, "connect timeout", true);
    }, this.options.connectTimeout);
    ws.onopen = () => {
      if (this._ws !== ws) return;
      if (token !== null && token !== undefined) {
        this._send({ type: "auth", token });
        // The gateway reads the token before any other frame, so the subscribes follow it at
        // once instead of a round trip later: a refused token closes the connection (4001)
        // before they are read, and `authenticated` comes before any of their answers.
        this._openFrames();
      } else this._goLive();
    };
    ws.onmessage = (event) => this._onMessage(ws, event.data);
    ws.onclose = (event) => {
      if (this._ws === ws) this._onSocketClosed(event.code);
    };
    ws.onerror = () => {}; // always followed by close, which carries the code
  }

  _goLive() {
    this._clearTimeout(this._connectTimer);
    this._wsLive = true;
    this._wsHealth.live(this._now());
    this._everConnected = true;
    this._stopSse(); // back at the top of the ladder
    this._schedulePing();
    if (!this._wsOpen) this._openFrames();
    else this._heardAll(this._ws); // (the subscribes are read from here)
    // Live, not proven yet: polling goes on until every subscribe is answered, or starts one
    // pollInterval from now (as while an SSE stream is unanswered), so a connection that never
    // answers leaves no silence longer than that.
    const answers = this._answers.get(this._ws);
    if (!answers || answers.asked.size === 0) this._proveSocket();
    else if (!this._polling) this._startPolling(this.options.pollInterval);
    // Polling on with no round due nor under way: a stream held its rounds (_pollsHeld), and
    // _stopSse ended it without letting them go.
    else if (this._pollTimer === null && !this._pollRunning) this._pollSoon();
    this._updateState();
  }

  /** The live WebSocket answered every subscribe sent on it: a success (see SocketHealth.proven). */
  _proveSocket() {
    if (!this._wsLive || !this._wsHealth.prove()) return;
    // The rounds under way (of every project) end; a project the gateway refused for its
    // subscription limit is polled on, alone, from now (_pollAll).
    this._stopPolling();
    if (this._anyRefusedForLimit()) this._startPolling(0);
    this._updateState();
  }

  /** Frames may go on the new WebSocket: every project subscribes (resuming from its cursor). */
  _openFrames() {
    this._wsOpen = true;
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
  }

  _send(message) {
    const ws = this._ws;
    if (ws && typeof ws.send === "function" && ws.readyState === 1) ws.send(JSON.stringify(message));
  }

  _schedulePing() {
    this._clearTimeout(this._pingTimer);
    this._pingTimer = this._setTimeout(() => {
      if (!this._wsLive) return;
      this._send({ type: "ping" });
      this._pingSentAt = this._now();
      this._pongTimer = this._setTimeout(() => {
        // Nothing at all came back: the connection is dead even if the browser has not noticed
        // (or a frame that long is still arriving: the next connection waits longer).
        if (!this._wsLive) return;
        this._pongBound.gaveUp(this._now());
        this._dropSocket(CloseCode.ABNORMAL, "ping timeout", true);
      }, this.options.pongTimeout * this._pongBound.factor(this._now()));
    }, this.options.pingInterval);
  }

  _onMessage(ws, data) {
    if (ws !== this._ws) return;
    // Any frame proves the connection alive; one within pongTimeout of a ping, the link quick.
    if (this._pongTimer !== null && this._now() - this._pingSentAt <= this.options.pongTimeout) this._pongBound.answeredInTime();
    this._clearTimeout(this._pongTimer);
    this._pongTimer = null;
    if (this._wsLive) this._schedulePing();
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      this._reportError({ code: "invalid_frame", message: "gateway sent a frame that is not JSON" });
      return;
    }
    if (!message || typeof message !== "object") return;
    const afterForbidden = this._forbiddenLast;
    this._forbiddenLast = message.type === "error" && message.code === "forbidden" ? message.project_id : null;
    switch (message.type) {
      case "authenticated":
        this._refreshSent = false;
        if (!this._wsLive) this._goLive();
        this._scheduleRefresh(message);
        return;
      case "subscribed":
        return this._onSubscribed(message, ws);
      case "resync_required":
        return this._onResyncRequired(message, ws);
      case "error":
        return this._onGatewayError(message);
      case "presence":
      case "presence_diff":
        return this._onPresence(message);
      case "unsubscribed":
        return this._onUnsubscribed(message, afterForbidden === message.project_id);
      case "pong":
        return;
      default:
        if (Number.isSafeInteger(message.seq) && Number.isSafeInteger(message.project_id)) {
          this._onEvent(message, "websocket", { text: data });
        }
    }
  }

  /** `subscribed` on `conn` (the WebSocket, or an SSE stream). */
  _onSubscribed(message, conn) {
    const sub = this._subs.get(message.project_id);
    if (!sub) return this._answered(conn, message.project_id); // dropped meanwhile: an answer all the same
    // Subscribed, on the WebSocket too: a later failure on an SSE stream is the first of its run
    // (the reopens trying it live again start from the first delay, _sseSubscriptionFailed).
    sub.sseFailures = 0;
    if (!this._hasCursor(sub, message)) return;
    this._tagsKnown(message);
    this._answered(conn, sub.projectId);
    this._clearTimeout(sub.retryTimer);
    sub.retry = 0;
    sub.gapWaiting = false; // a `subscribed` after a replay from the cursor: the repair's, or as good
    if (this._wsLive) {
      sub.wsSubscribed = true;
      sub.refusalKept = 0; // (found room: no place to keep)
      // An answer when none was counted as unanswered: a refusal was taken for this subscribe's
      // (an activity refused while it was unanswered, _onRateLimited), and the subscribe held
      // for it is moot (the activity goes again below).
      if (sub.subscribesSent > 0) sub.presenceDue = this._subscribeAnswered(sub);
      else {
        this._pacer.drop(`subscribe:${sub.projectId}`);
        sub.presenceDue = sub.presenceHandlers.size > 0; // (its own ask was taken off with the refusal)
      }
      if (sub.refusedForLimit) {
        // A subscribe sent again (a presence listener, a freed slot) found room: the WebSocket
        // carries it now.
        sub.refusedForLimit = false;
        sub.slotOffered = false;
        this._pollRefusedOnly();
      }
      if (sub.subscribesSent === 0) this._releasePollsOf(sub);
      // A (re)subscribe lists this tab afresh, with no activity: say it again.
      sub.activitySent = null;
      const activity = this._activity.get(sub.projectId);
      if (activity && (activity.viewing !== null || activity.answering !== null)) this._sendActivity(sub);
    }
    if (conn === this._ws && sub.answersStaleSubscribe({ final: true })) {
      // Polling (it runs until the WebSocket has answered every subscribe, _proveSocket), or the
      // SSE stream the WebSocket replaces (it runs until `authenticated`), moved the cursor
      // after this subscribe went out: the answer is for the cursor left behind. A top behind
      // the cursor they reached, or a first contact's when they made it, would be taken for a
      // history that moved back and reload the application. Not judged: subscribed again
      // from the cursor, and the project's polls wait for that answer (_holdPollsOf), so it is
      // for the cursor it asked from and is judged as any; the replay before it was ignored.
      this._sendSubscribe(sub);
      if (this._polling) this._holdPollsOf(sub);
      return;
    }
    if (sub.cursor.onSubscribed(message)) {
      if (conn !== this._ws) sub.fallbackMoves += 1; // (a stream's: see answersStaleSubscribe)
      this._runResync(sub);
    } else if (!sub.cursor.resyncing && !sub.cursor.resyncSinceSubscribe && sub.cursor.seq < message.seq) {
      // A resume's replay (it comes before `subscribed`) stopped short of the top: a repair's,
      // or a reconnect's (every project resumes from its cursor on a new WebSocket or SSE
      // stream). Either way it is a gap, even if no later event comes to show it, paced and
      // counted like any other. (After resync_required, nothing was replayed: not a gap.)
      this._onGap(sub, null, this._wsLive ? "websocket" : "sse", message.seq, tagOf(message));
    }
  }

  _onResyncRequired(message, conn) {
    const sub = this._subs.get(message.project_id);
    if (!sub || !this._hasCursor(sub, message)) return;
    this._tagsKnown(message);
    this._heard(conn, sub.projectId); // (its `subscribed` follows)
    // Answering a subscribe sent before polling or SSE moved the cursor (as a replay then,
    // _onEvent): it judges the cursor left behind. Its `subscribed` resubscribes from the one
    // reached.
    if (conn === this._ws && sub.answersStaleSubscribe()) return;
    if (sub.cursor.atTop(message)) return; // nothing missing (as the Python consumer)
    sub.cursor.beginResync(message.epoch, message.seq, tagOf(message), { live: true });
    if (conn !== this._ws) sub.fallbackMoves += 1;
    this._runResync(sub);
  }

  /** A gateway that names a tag knows them: polls and SSE resumes carry tags again. */
  _tagsKnown(message) {
    if (tagOf(message) !== null) this._tagsRefused = false;
  }

  /** `subscribed` and `resync_required` carry the cursor to continue from; one without a valid
   * {epoch, seq} would leave the project's cursor unknown (every later event held, never
   * delivered) or nonsensical: it is reported and ignored. */
  _hasCursor(sub, message) {
    if (isCursor(message)) return true;
    this._reportError({ code: "invalid_frame", message: `gateway sent ${message.type} without a valid {epoch, seq}`, projectId: sub.projectId });
    return false;
  }

  /**
   * An `error` from the gateway (each is reported to onError). What it does to the project it
   * names depends on its code (docs/browser.md, the table of errors in "Reconnection and close
   * codes"):
   * - `rate_limited`: the frame is sent again, paced (_onRateLimited);
   * - `unavailable` right after the `subscribed` of a subscribe that asked presence
   *   (presenceDue): only the presence read failed, the events flow. Not a subscribe's answer:
   *   nothing is counted, no poll hold ends; presence is asked again on the project's backoff
   *   (a subscribe with presence from the cursor, as docs/protocol.md says);
   * - `unavailable` with `ended` in that moment: the gateway ended the subscription (its
   *   project's data unreadable) while the presence read waited: subscribed again on the
   *   project's subscribe backoff;
   * - `unavailable` otherwise: the subscribe was refused (Redis), or the subscription ended:
   *   sent again on the backoff;
   * - `too_many_subscriptions`: the connection follows as many projects as the gateway allows;
   *   polling, which has no such limit, carries this one while the connection lives;
   * - `not_subscribed`: answers an `unsubscribe` or `activity`, never a subscribe;
   * - any other (`forbidden`, `invalid_cursor`, ...): the subscribe's answer, reported only
   *   (polling would be refused alike).
   */
  _onGatewayError(message) {
    this._reportError({ code: message.code, message: message.message, projectId: message.project_id });
    if (message.code === "rate_limited") return this._onRateLimited(message);
    const sub = message.project_id != null ? this._subs.get(message.project_id) : null;
    if (sub && message.code === "unavailable" && message.ended === true && sub.presenceDue && this._wsLive) {
      // The gateway ended the subscription while its presence read waited (the project's data
      // unreadable): not presence's failure, and no subscribe's answer either (the gateway
      // takes up the project's next frame after that read). The read that finishes later
      // finds the project gone and sends nothing. Subscribed again on the subscribe's backoff,
      // not presence's (grown to 30 s while presence fails), unless a subscribe is on its way:
      // its answer, or its refusal's retry, brings the project back.
      sub.presenceDue = false;
      this._slotFreedByGateway(sub);
      this._presenceUnknown(sub); // (the gateway took the tab out of the project's presence)
      sub.retry = (sub.retry || 0) + 1;
      if (sub.subscribesSent === 0) this._retrySubscribe(sub, sub.retry);
      return;
    }
    if (sub && message.code === "unavailable" && sub.presenceDue && this._wsLive) {
      // (Without `ended`, from a gateway before it, a subscription ended in this moment is
      // taken for presence's failure too: the re-ask below subscribes it again, later.)
      sub.presenceDue = false;
      this._presenceUnknown(sub);
      // (A subscribe of the project asking presence is on its way already: its answer brings it.)
      // Its own backoff, grown by each failure and reset by a `presence` only: every re-ask
      // is answered `subscribed`, which resets the subscribe's, and a presence outage would
      // cost a subscribe a second.
      sub.presenceRetry += 1;
      if (sub.presenceHandlers.size > 0 && !sub.presenceAsks.includes(true)) this._retrySubscribe(sub, sub.presenceRetry);
      return;
    }
    if (message.code === "not_subscribed") {
      // An unsubscribe's answer when the gateway had ended the subscription already (crossing
      // the frame that said so), or an activity's: one of those went out before any unsubscribe
      // of the project (none goes for a project not followed, nor an activity before its
      // `subscribed`), so that unsubscribe's own `not_subscribed` follows: the count ends right.
      if (message.project_id != null) this._unsubscribeAnswered(message.project_id);
      return;
    }
    if (message.project_id != null) this._answered(this._ws, message.project_id);
    if (sub && sub.subscribesSent > 0) this._subscribeAnswered(sub); // its answer
    if (sub && sub.subscribesSent === 0 && sub.pollHoldTimer !== null) {
      // A resubscribe after a stale answer refused: nothing carries the project but polls now
      // (a retry's answer is its own). Polled at once, as when its hold ends or the WebSocket
      // goes: unpolled since its hold began, the next round could be up to pollInterval away,
      // an answer keeping it unpolled longer than no answer at all.
      this._releasePollsOf(sub);
      if (this._polling) this._pollSoon();
    }
    if (sub && message.code === "too_many_subscriptions" && this._wsLive) {
      // The gateway's --max-subscriptions: more projects than that on one connection. Polled,
      // alone once the WebSocket is proven (_pollAll), until this connection ends; the next
      // one subscribes it again (the limit may differ there). Presence comes by WebSocket only.
      // Refused again (the subscribe sent for a freed slot, which a subscribe of a project the
      // page added took first): it keeps its place among the refused, and its polls, which
      // went on while that subscribe was unanswered, their pace (no round at once).
      const again = sub.refusedForLimit;
      if (!again) sub.refusedForLimitAt = sub.refusalKept || ++this._limitRefusals;
      sub.refusalKept = 0;
      sub.refusedForLimit = true;
      // The next slot freed may go to it, once no subscribe of it is on its way (sent, or held
      // by the pacing): this refusal may answer another one (sent for a presence listener
      // before the freed slot's), and the freed slot's, still to come, takes that slot (a
      // second offer would be moot, and the next refused project left polled).
      if (sub.subscribesSent === 0 && !this._pacer.queue.has(`subscribe:${sub.projectId}`)) sub.slotOffered = false;
      this._presenceUnknown(sub);
      if (again || !this._wsHealth.proven) {
        /* polling runs (until every subscribe is answered, then on for it: _proveSocket) */
      } else if (this._polling) this._pollSoon();
      else this._startPolling(0);
    }
    if (sub && message.code === "unavailable") {
      // A subscription the gateway followed ended (`ended`; or a subscribe of it sent again
      // failed, which ends the one before): its slot is free. So is the one a project refused
      // for the limit was given, when the gateway ends the subscription it was making there
      // (`ended`: its data unreadable, which may last): passed on to the next refused project
      // (not back to this one), as it keeps no claim on it. It holds no offer then (unless
      // another subscribe of it is on its way: that one takes the slot), so dropped before its
      // retry it frees none. (A plain `unavailable` there is Redis failing, for the others too:
      // its retry takes the slot back.)
      const passedOn = !sub.wsSubscribed && message.ended === true && sub.slotOffered;
      if (sub.wsSubscribed || passedOn) this._slotFreedByGateway(sub);
      if (passedOn && sub.subscribesSent === 0 && !this._pacer.queue.has(`subscribe:${sub.projectId}`)) sub.slotOffered = false;
      sub.retry = (sub.retry || 0) + 1;
      this._retrySubscribe(sub, sub.retry);
    }
  }

  /** Subscribe `sub` again later, the backoff's delay for its `attempt`-th retry (and the
   * connection's pacing): a subscribe refused as `unavailable`, or presence unavailable. */
  _retrySubscribe(sub, attempt) {
    this._clearTimeout(sub.retryTimer);
    sub.retryTimer = this._setTimeout(() => {
      if (this._wsOpen && this._subs.get(sub.projectId) === sub) this._sendSubscribe(sub);
    }, backoffDelay(attempt - 1, this.options.backoff, this._random));
  }

  /**
   * A project the connection followed was dropped: the gateway has room for one more, and the
   * project it refused for its subscription limit first (and not given a slot already) is
   * subscribed again, on the connection's pacing, from its cursor like any subscribe (polling
   * goes on until it is answered; a poll that moves the cursor meanwhile makes its answer a
   * stale one, asked again, nothing lost or twice). Polled until the next connection, it could
   * otherwise lag by a pollInterval for hours on a long-lived page. Refused again (a project
   * the page added took the slot first), it stays polled, and waits for another slot.
   */
  _offerFreedSlot() {
    let oldest = null;
    for (const sub of this._subs.values()) {
      if (!sub.refusedForLimit || sub.slotOffered) continue;
      if (oldest === null || sub.refusedForLimitAt < oldest.refusedForLimitAt) oldest = sub;
    }
    if (oldest === null) return;
    oldest.slotOffered = true;
    this._sendSubscribe(oldest);
  }

  /**
   * The page dropped a project whose slot on the connection is free now (its unsubscribe went,
   * or the subscribe of a slot it was offered never did): the slot is offered
   * (_offerFreedSlot) once the page's current task is over (a microtask), unless the page adds
   * the project back before (_keepFreedSlot). React runs an effect's cleanup and then its setup
   * in one go; offered at once, the slot went to the refused project (its subscribe following
   * the unsubscribe), and the project added back was refused and polled in its stead.
   */
  _slotFreedByPage(projectId) {
    this._slotsFreed.push(projectId);
    if (this._slotOfferQueued) return;
    this._slotOfferQueued = true;
    Promise.resolve().then(() => {
      const freed = this._slotsFreed.length;
      this._slotsFreed = [];
      this._slotOfferQueued = false;
      if (this._closed || !this._wsLive) return; // (a new connection subscribes every project)
      for (let i = 0; i < freed; i += 1) this._offerFreedSlot();
    });
  }

  /** A project the page dropped in this task is added back (`sub`): the slot it freed is its own
   * again (its subscribe follows its unsubscribe), not offered; refused for the limit, it keeps
   * its place among the refused (its subscribe refused again takes it). */
  _keepFreedSlot(sub) {
    const i = this._slotsFreed.indexOf(sub.projectId);
    if (i >= 0) this._slotsFreed.splice(i, 1);
    const at = this._refusalsDropped.get(sub.projectId);
    if (at !== undefined) {
      this._refusalsDropped.delete(sub.projectId);
      sub.refusalKept = at;
    }
  }

  /**
   * The gateway ended a subscription of `sub` itself (its data unreadable, a subscribe of it
   * sent again failed, or a refreshed token no longer allows it): the slot is offered at once,
   * as one the page freed, to the project refused first. An ended project is subscribed again
   * on its backoff (1 s): the slot taken by then, it is refused in turn, polled, and waits for
   * the next slot freed like any refused project (the last refused: after those refused before).
   * No slot stays empty while a project's data stays unreadable, and the two do not trade it
   * back and forth: only a slot freed is offered, never one taken.
   */
  _slotFreedByGateway(sub) {
    sub.wsSubscribed = false;
    if (this._wsLive) this._offerFreedSlot();
  }

  /**
   * `unsubscribed`: the answer to an unsubscribe of the page's, or, answering none, the gateway
   * dropped a project itself (a refreshed token no longer allows it, after error `forbidden`):
   * the project's slot is free, and nothing of it comes until a later connection. The gateway
   * sends that `forbidden` and its `unsubscribed` back to back (`afterForbidden`), and never so
   * for an unsubscribe of the page's (a project it refuses `forbidden` is one it does not
   * follow: the page's unsubscribe after it is answered `not_subscribed`): its own even when
   * an unsubscribe of the page's is unanswered, one sent after the token refresh (the page
   * dropped the project and added it back meanwhile), whose `not_subscribed` follows.
   */
  _onUnsubscribed(message, afterForbidden) {
    if (!afterForbidden && this._unsubscribeAnswered(message.project_id)) return;
    const sub = this._subs.get(message.project_id);
    if (!sub) return;
    this._presenceUnknown(sub); // (the gateway took the tab out of the project's presence)
    this._slotFreedByGateway(sub);
  }

  /** Takes one unsubscribe of `projectId` off those unanswered: false when none was. */
  _unsubscribeAnswered(projectId) {
    const due = this._unsubscribesDue.get(projectId) || 0;
    if (due === 0) return false;
    if (due === 1) this._unsubscribesDue.delete(projectId);
    else this._unsubscribesDue.set(projectId, due - 1);
    return true;
  }

  /** Whether a project refused for the gateway's subscription limit is carried by polling. */
  _anyRefusedForLimit() {
    for (const sub of this._subs.values()) if (sub.refusedForLimit) return true;
    return false;
  }

  /** With the WebSocket proven, polling goes on only while it carries a project refused for the
   * subscription limit. */
  _pollRefusedOnly() {
    if (this._wsHealth.proven && this._polling && !this._anyRefusedForLimit()) this._stopPolling();
  }

  _dropSocket(code, reason, treatAsClose = false) {
    const ws = this._ws;
    if (!ws) return;
    if (typeof ws.close === "function") {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code === CloseCode.NORMAL ? 1000 : 4000, reason);
      } catch {
        /* already closed */
      }
    }
    if (treatAsClose) this._onSocketClosed(code);
    else this._cleanupSocket();
  }

  _cleanupSocket() {
    // Polling that carried only projects this connection refused for its subscription limit
    // ends with it: the next connection subscribes them again, and the fallbacks are its own
    // (_onSocketClosed), not a round of every project at once.
    const pollingRefusedOnly = this._wsHealth.proven && this._polling;
    for (const timer of ["_connectTimer", "_pingTimer", "_pongTimer", "_refreshTimer"]) {
      this._clearTimeout(this[timer]);
      this[timer] = null;
    }
    this._forgetAnswers(this._ws);
    this._ws = null;
    this._wsLive = false;
    this._wsHealth.ended();
    this._wsOpen = false;
    this._refreshSent = false;
    // The next connection has a bucket of its own on the gateway: nothing held, nothing to wait.
    this._pacer.reset();
    this._clearTimeout(this._pacerTimer);
    this._pacerTimer = null;
    this._unsubscribesDue.clear();
    this._slotsFreed = []; // (the next connection subscribes every project: no slot to offer)
    this._refusalsDropped.clear(); // (nor a refusal's place: its refusals are its own)
    let held = false;
    for (const sub of this._subs.values()) {
      // Polls held for a subscribe's answer that will not come now go on at once (the project
      // unpolled since its stale answer, up to connectTimeout: not a pollInterval on top).
      held = held || sub.pollHoldTimer !== null;
      this._releasePollsOf(sub);
      // The retry of a subscribe refused as `unavailable`: the next connection subscribes every
      // project anyway (a retry of this one's sent there was a second subscribe, its replay twice).
      this._clearTimeout(sub.retryTimer);
      sub.retryTimer = null;
      sub.wsSubscribed = false;
      sub.gapWaiting = false; // the next connection's events are its own replay
      sub.subscribesSent = 0;
      sub.presenceAsks = [];
      sub.presenceDue = false;
      sub.refusedForLimit = false;
      sub.slotOffered = false;
      sub.refusalKept = 0;
      sub.activitySent = null;
    }
    if (pollingRefusedOnly) this._stopPolling();
    if (held && this._polling) this._pollSoon();
  }

  _onSocketClosed(code) {
    const wasLive = this._wsLive;
    // A connection up for stableAfter resets the backoff; one given up on for not answering a
    // subscribe was up, not stable: while a gateway stays stuck the delays keep growing.
    // One that ends before it is stable is no success either: it counts as a failed attempt, so
    // the fallbacks (SSE, else polling) carry the events through the backoff's delay. Before, a
    // gateway dropping every connection before answering got no fallback at all, and one
    // answering and dropping each soon after left a silence as long as the delay (up to 30 s).
    const { proven, stable } = this._wsHealth.closedOutcome(this._now(), { wasLive, gaveUp: this._gaveUp === this._ws });
    if (this._gaveUp === this._ws) this._gaveUp = null; // (an SSE stream given up on stays so)
    this._cleanupSocket();
    if (this._closed) return;
    if (stable) this._wsHealth.wasStable();
    const action = closeAction(code);
    if (action.clientBug) this._reportError({ code: "closed", message: `gateway closed the connection with ${code}`, closeCode: code });
    if (code === CloseCode.AUTH_FAILED || code === CloseCode.TOKEN_REVOKED) {
      // The person's token was refused: the app may want to say so (access removed, signed out)
      // rather than show a network outage. Over SSE and polling the same refusal comes as a 401
      // (invalid_token); here it is the close code.
      const revoked = code === CloseCode.TOKEN_REVOKED;
      this._reportError({
        code: revoked ? "token_revoked" : "auth_failed",
        message: revoked ? "the gateway closed the connection: token revoked" : "the gateway refused the token",
        closeCode: code,
      });
    }
    if (action.renewToken) this._token = null;
    // Prompt once until a connection is stable: a drained pod refuses new handshakes, so a
    // second such close soon after is no drain moving us elsewhere. A gateway (or proxy) that
    // takes each connection and closes it at once so was reconnected to, by every tab, several
    // times a second for ever.
    if (wasLive && action.delay === "prompt" && this._wsHealth.takePrompt()) {
      this._scheduleReconnect(Math.round(this._random() * this.options.promptDelayMax));
      this._updateState();
      return;
    }
    // Nor is one that answered and was closed to be resumed at once (a drain's 1001/1012 after
    // the prompt reconnect was used): a rolling restart moves a tab from pod to pod within
    // stableAfter, and counting those closes sent every tab of the fleet to SSE (else polling)
    // against the gateway being deployed. It waits the backoff; polling starts one
    // pollInterval from now (stopped, unused, by a next connection answering sooner), so a
    // gateway draining every connection soon after it answers, the backoff grown, leaves no
    // silence longer than that.
    const drained = !stable && proven && action.delay === "prompt";
    if (drained) this._startPolling(this.options.pollInterval);
    // Nor is a token refused (4001), expired (4002) or revoked (4003) on a connection that had
    // answered: the WebSocket works, the token was what failed, and the next attempt asks for
    // a new one. Counting it sent the tab to SSE and polling with a token minted in the
    // revocation's second, each refused (401) and asking the token endpoint again.
    const tokenRefused = proven && action.renewToken;
    this._afterFailure(code, stable || drained || tokenRefused);
  }

  /** A WebSocket attempt ended: it counts as failed unless `spared` (stable, or a proven one
   * closed to be resumed at once: see _onSocketClosed). */
  _afterFailure(code, spared = false) {
    this._wsHealth.attemptFailed({ spared });
    if (this._wsHealth.shouldFallBack()) this._fallBack();
    this._scheduleReconnect(this._wsHealth.reconnectDelay());
    this._updateState();
  }

  _scheduleReconnect(delay) {
    this._clearTimeout(this._reconnectTimer);
    this.nextRetryAt = this._now() + delay;
    this._reconnectTimer = this._setTimeout(() => {
      this._reconnectTimer = null;
      this._connect();
    }, delay);
  }

  _handleOffline() {
    // The network is gone: an open socket is dead even if the browser has not noticed yet (that
    // could take until the ping timeout). Drop it and wait for "online" rather than retry in vain.
    if (this._closed) return;
    if (this._ws) this._dropSocket(CloseCode.NORMAL, "browser offline");
    this._stopPolling();
    this._stopSse();
    this._scheduleReconnect(this.options.backoff.max);
    this._updateState();
  }

  /** `delay` of a fallback's retry, at least backoff.max while the browser says it is offline
   * (each transport tries at most once per backoff.max then; see _connect). */
  _offlineDelay(delay) {
    return this._isOnline() ? delay : Math.max(delay, this.options.backoff.max);
  }

  _handleOnline() {
    this._updateState();
    if (!this._wsLive) {
      this._wsHealth.resetBackoff();
      this._sseHealth.resetBackoff();
      this.reconnect();
      if (this._polling) this._pollSoon();
    }
  }

  // --- events and resync -----------------------------------------------------------------------

  /** An event frame (`origin`: where its tag comes from, see ProjectCursor.accept). Returns the
   * event when it is past a gap (else null). */
  _onEvent(event, via, origin = null) {
    const sub = this._subs.get(event.project_id);
    if (!sub) return null;
    if (via === "websocket" && sub.answersStaleSubscribe()) {
      // A replay answering a subscribe sent before polling or SSE moved the cursor: for the
      // cursor left behind, and maybe of a history a poll has since been told is gone (a new
      // epoch; events carry none, so their seq alone would place them in the new one). Not
      // taken: the project is subscribed again from the cursor reached when that answer ends
      // (_onSubscribed).
      this._heard(this._ws, sub.projectId);
      return null;
    }
    const { deliver, gap } = sub.cursor.accept(event, origin);
    if (via !== "websocket" && deliver.length > 0) sub.fallbackMoves += 1;
    // A replay answering the project's subscribe in part; an event past a gap (a live one,
    // dropped while a repair is due) comes whether or not the gateway handles the subscribe.
    if (!gap && via !== "polling") this._heard(via === "websocket" ? this._ws : this._sse, sub.projectId);
    this._deliver(sub, deliver);
    if (!gap) return null;
    // A gap in a poll answer is judged once per answer (_pollProject).
    if (via !== "polling") this._onGap(sub, event, via);
    return event;
  }

  _deliver(sub, events) {
    for (const event of events) {
      // A handler may have closed the bus or dropped the project: nothing more of this batch.
      if (this._closed || this._subs.get(sub.projectId) !== sub) return;
      for (const handler of Array.from(sub.handlers)) {
        try {
          handler(event);
        } catch (error) {
          // One failing handler must not break ordering or the other handlers.
          this._reportError({ code: "handler_failed", message: describe(error), projectId: sub.projectId, error });
        }
      }
    }
  }

  /**
   * A gap: `event` is past cursor + 1, or (event null) a resume's replay (a repair's or a
   * reconnect's) stopped short of `top` (its `subscribed` naming `topTag`, the tag at `top`).
   * The gateway never leaves gaps; if one shows anyway, ask again from the cursor rather than
   * skip an event: one repair at a time (events after a gap keep coming until the repair's
   * `subscribed`), paced (at once, then on backoff while gaps keep coming), and after GAP_REPAIRS
   * repairs from the same cursor the gap is surfaced as a resync (history_corrupt), as the
   * Python consumer does: an entry no client can place would otherwise be asked for forever,
   * nothing delivered past it and nothing said. Over polling the next poll is the repair.
   */
  _onGap(sub, event, via, top = null, topTag = null) {
    if (this._closed || this._subs.get(sub.projectId) !== sub || sub.cursor.resyncing) return;
    if (via !== "polling" && (sub.gapWaiting || sub.gapTimer !== null)) return; // on its way
    const from = `${sub.cursor.epoch}:${sub.cursor.seq}`;
    if (sub.gapFrom !== from) {
      sub.gapFrom = from;
      sub.gapRepairs = 0;
    }
    if (sub.gapRepairs >= GAP_REPAIRS) {
      sub.gapFrom = null;
      sub.gapRepairs = 0;
      const seq = event ? event.seq - 1 : top;
      this._reportError({
        code: "history_corrupt",
        message: `the events after seq ${sub.cursor.seq} did not come after ${GAP_REPAIRS} repairs: reloading, to continue after seq ${seq}`,
        projectId: sub.projectId,
      });
      // Reloaded up to `top`, the cursor takes the tag its `subscribed` named there (resumes stay
      // checked); before an event past a gap, the tag is unknown (that event follows at once).
      sub.cursor.beginResync(sub.cursor.epoch, seq, event ? null : topTag);
      if (via !== "websocket") sub.fallbackMoves += 1;
      if (event) sub.cursor.accept(event); // held, delivered after the reload
      this._runResync(sub);
      return;
    }
    sub.gapRepairs += 1;
    if (via !== "polling") this._scheduleRepair(sub);
  }

  /** Ask again from the cursor: at once after a quiet while, else on the project's backoff. */
  _scheduleRepair(sub) {
    if (sub.gapTimer !== null) return;
    sub.gapBackoff = sub.gapBackoff || new Backoff(this.options.backoff, this._random);
    if (sub.lastRepairAt === null || this._now() - sub.lastRepairAt >= this.options.stableAfter) {
      sub.gapBackoff.reset();
      this._repairNow(sub);
      return;
    }
    sub.gapTimer = this._setTimeout(() => {
      sub.gapTimer = null;
      this._repairNow(sub);
    }, sub.gapBackoff.next());
  }

  _repairNow(sub) {
    // During a reload the repair waits: endResync reports a gap still there.
    if (this._closed || this._subs.get(sub.projectId) !== sub || sub.cursor.resyncing) return;
    sub.lastRepairAt = this._now();
    if (this._wsLive) {
      sub.gapWaiting = true;
      this._sendSubscribe(sub);
    } else if (this._sse) {
      sub.gapWaiting = true;
      this._reopenSse(); // resumes from the cursors
    } else if (this._polling) {
      this._pollSoon();
    }
  }

  /** Call onResync until it succeeds for the latest resync, then apply what was buffered. */
  async _runResync(sub) {
    if (sub.resyncRunning) return; // the running loop notices the newer generation
    sub.resyncRunning = true;
    const backoff = new Backoff(this.options.backoff, this._random);
    try {
      for (;;) {
        const generation = sub.cursor.generation;
        let ok = true;
        let snapshot;
        const slow = this._setTimeout(() => {
          this._reportError({
            code: "resync_slow",
            message: `onResync(${sub.projectId}) has not settled after ${this.options.resyncSlowAfter} ms: the project's events are held until it does`,
            projectId: sub.projectId,
          });
        }, this.options.resyncSlowAfter);
        try {
          if (this.options.onResync) snapshot = await this.options.onResync(sub.projectId);
        } catch (error) {
          ok = false;
          this._reportError({ code: "resync_failed", message: describe(error), projectId: sub.projectId, error });
        } finally {
          this._clearTimeout(slow);
        }
        if (this._closed || this._subs.get(sub.projectId) !== sub) return;
        if (!ok) {
          // The application's API failed: keep buffering and try again; never go on with stale state.
          // The wait is the subscription's, so close() (and dropping the project) ends it at once.
          await new Promise((resolve) => {
            sub.resyncWait = { resolve, timer: this._setTimeout(resolve, backoff.next()) };
          });
          sub.resyncWait = null;
          if (this._closed || this._subs.get(sub.projectId) !== sub) return;
          continue;
        }
        if (generation === sub.cursor.generation) {
          this._adoptSnapshot(sub, snapshot);
          break;
        }
      }
      const { deliver, gap } = sub.cursor.endResync();
      this._deliver(sub, deliver);
      if (gap) this._scheduleRepair(sub);
    } finally {
      sub.resyncRunning = false;
    }
  }

  /** onResync's answer: a snapshot cursor to continue after, or nothing (docs/browser.md). */
  _adoptSnapshot(sub, snapshot) {
    if (snapshot === undefined || snapshot === null) return;
    if (!isCursor(snapshot)) {
      this._reportError({ code: "invalid_snapshot_cursor", message: "onResync resolved to something that is not {epoch, seq}", projectId: sub.projectId });
      return;
    }
    if (snapshot.epoch !== sub.cursor.epoch) {
      // The gateway answers a cursor of a lost epoch with resync_required: an application whose
      // snapshots keep naming another epoch would reload forever. Past 3 in a row, ignore them.
      sub.staleSnapshots += 1;
      if (sub.staleSnapshots > 3) {
        this._reportError({ code: "snapshot_cursor_ignored", message: `the snapshot's epoch ${snapshot.epoch} is not the gateway's ${sub.cursor.epoch}`, projectId: sub.projectId });
        return;
      }
    } else {
      sub.staleSnapshots = 0;
    }
    sub.cursor.adoptSnapshot(snapshot);
  }

  // --- Server-Sent Events fallback ---------------------------------------------------------------

  _sseSupported() {
    return (
      this.options.sse !== false &&
      !!this._fetch &&
      typeof TextDecoder === "function" &&
      typeof AbortController === "function"
    );
  }

  /** WebSocket cannot connect: SSE when it can work (polling meanwhile only if it fails), else
   * polling. */
  _fallBack() {
    if (this._sseSupported()) this._startSse();
    else if (this._pollDeferred) this._pollSoon(); // (started while a WebSocket was unproven)
    else this._startPolling();
  }

  /** Whether WebSocket is off, unsupported, or has failed often enough to use the fallbacks. */
  _fallingBack() {
    return typeof this._WebSocket !== "function" || this._wsHealth.shouldFallBack();
  }

  _startSse() {
    if (this._closed || this._wsLive || this._sse || this._sseRetryTimer || !this._sseSupported()) return;
    if (this._subs.size === 0) return; // nothing to stream; subscribe() starts it
    this._connectSse();
  }

  _stopSse() {
    this._clearTimeout(this._sseRetryTimer);
    this._sseRetryTimer = null;
    this._nextStreamHold = 0; // (polling stops too: nothing to hold)
    this._clearTimeout(this._sseRefreshTimer);
    this._sseRefreshTimer = null;
    // A stream opened later starts the presence reopens over: also when no stream was open (the
    // WebSocket took over between two, one broken and the next waiting on the SSE backoff).
    this._ssePresenceReopens = 0;
    const attempt = this._sse;
    this._sse = null;
    this._sseLive = false;
    if (attempt) {
      this._clearTimeout(attempt.reopenTimer); // (the WebSocket asks presence now)
      attempt.reopenTimer = null;
      this._forgetAnswers(attempt);
      attempt.controller.abort();
    }
  }

  /** Open a new stream now (other projects, a gap, a token about to expire). */
  _reopenSse() {
    const attempt = this._sse;
    if (!attempt) return;
    attempt.reopen = true;
    attempt.controller.abort(); // the read loop ends; _sseEnded opens the next stream at once
  }

  async _connectSse() {
    this._clearTimeout(this._sseRetryTimer);
    this._sseRetryTimer = null;
    // live: its response opened; proven: it answered for one of its projects (only then does it
    // count as live, see _proveSse); asked: each project's cursor as the stream asked from it;
    // failed: the projects whose subscription an `error` said failed (refused or ended: the
    // stream goes on for the others, these are polled, _sseSubscriptionFailed); idle: cut for
    // sseIdleTimeout without a line;
    // holdsPolls: polls wait for its first answer, until holdEndsAt at the latest; presence: it
    // asked presence (?presence=1); presenceDue: the projects whose `subscribed` came and neither
    // their `presence` nor the error saying their presence read failed; presenceWanted: the
    // projects with presence listeners as it opened, whose `presence` has not come on it;
    // presenceFailed: a presence read failed on it; reopenTimer: the timer of the planned reopen
    // asking presence again after such a failure, or a failed subscription, due at reopenAt;
    // reopenDue: that reopen is due, and waits for the gateway to have subscribed every project
    // of the stream; passedLive: it replaces a stream that delivered (a planned reopen: shown
    // live meanwhile, see _sseEnded); refusedAsked: refused for asking what a gateway from before
    // does not know (400: ?partial=1, a tag), it is asked again at once without.
    const hold = this._nextStreamHold;
    this._nextStreamHold = 0;
    const attempt = { controller: new AbortController(), live: false, proven: false, stale: false, failed: new Set(), idle: false, asked: new Map(), closeCode: null, reopen: false, openedAt: null, retryAfter: 0, holdsPolls: hold > 0, holdEndsAt: this._now() + hold, presence: false, presenceDue: new Set(), presenceWanted: new Set(), presenceFailed: false, reopenTimer: null, reopenAt: 0, reopenDue: false, passedLive: this._sseLive, refusedAsked: false };
    this._sse = attempt;
    const { signal } = attempt.controller;
    let response;
    let idle = null;
    let holdTimer = null;
    if (attempt.holdsPolls) {
      // The stream before this one answered, for a cursor polling had moved before its answer
      // came (a gateway slower to answer than pollInterval, on a busy project): were polls to go
      // on, this one's answer would be as stale, and the next's, for ever. Nothing moves the
      // cursors while it is unanswered (a round under way is dropped: its answer moves nothing),
      // so its answer is for the cursors it asked from; it replays what polls would have
      // delivered. Held for connectTimeout at most, counted from the first stream that held
      // them (a reopen passes on what is left): should the streams be held by a proxy after all,
      // polling carries on after that (and each stream is given up on its own bound).
      this._holdPolls();
      holdTimer = this._setTimeout(() => this._releasePolls(attempt), hold);
    }
    const watch = () => {
      // No byte (not even a keepalive comment) for this long: the stream is dead.
      this._clearTimeout(idle);
      idle = this._setTimeout(
        () => {
          attempt.idle = attempt.live;
          attempt.controller.abort();
        },
        attempt.live ? this.options.sseIdleTimeout : this.options.connectTimeout,
      );
    };
    try {
      watch();
      const presence = Array.from(this._subs.values()).some((sub) => sub.presenceHandlers.size > 0);
      attempt.presence = presence;
      for (const sub of this._subs.values()) if (sub.presenceHandlers.size > 0) attempt.presenceWanted.add(sub.projectId);
      // A new stream is a new resume of every project: its `subscribed` is judged afresh, as
      // after a WebSocket subscribe (an earlier reload must not excuse an unhonoured resume),
      // and what was held back during a reload is replayed again (ProjectCursor.resume).
      for (const sub of this._subs.values()) sub.cursor.resume();
      // Without tags after a gateway refused them (400: one from before tags) until one names a tag.
      const tags = !this._tagsRefused;
      const cursors = Array.from(this._subs, ([projectId]) => {
        const cursor = this.cursor(projectId);
        return [projectId, cursor && !tags ? { epoch: cursor.epoch, seq: cursor.seq } : cursor];
      });
      const tagged = cursors.some(([, cursor]) => tagOf(cursor) !== null);
      for (const sub of this._subs.values()) attempt.asked.set(sub.projectId, { sub, mark: cursorMark(sub.cursor) });
      // ?partial=1 (a stream that goes on past one project's failure), unless the last stream's
      // gateway, one from before it, refused it (400): without it then, as that gateway wants.
      const partial = !this._partialRefused;
      const { path, lastEventId } = sseRequest(cursors, { presence, partial });
      const headers = { Accept: "text/event-stream" };
      if (this._hasAuth) headers.Authorization = `Bearer ${await this._getToken(false)}`;
      if (lastEventId) headers["Last-Event-ID"] = lastEventId;
      if (this._sse !== attempt) return;
      response = await this._fetch(this.httpUrl + path, { headers, cache: "no-store", signal });
      if (this._sse !== attempt) return;
      if (!response.ok || !response.body || typeof response.body.getReader !== "function") {
        if (response.status === 401) this._token = null;
        attempt.retryAfter = retryAfterDelay(response, this.options.backoff.max);
        const detail = await errorDetail(response);
        if (response.status === 400 && partial && cursors.length > 1 && /\bpartial\b/.test(detail)) {
          // A gateway from before ?partial=1 refuses it ("unknown query parameters: partial"):
          // at once without it (a project's failure then ends the stream, as that gateway does).
          // Not reported: a question of what the gateway knows, asked again on every stream
          // (reported, every token refresh against such a gateway was an sse_http_400).
          this._partialRefused = true;
          attempt.reopen = true;
          attempt.refusedAsked = true;
          return;
        }
        this._reportError({ code: `sse_http_${response.status}`, message: detail });
        if (response.status === 400 && tagged && !this._tagsRefused) {
          // A gateway from before cursor tags refuses a 3-part Last-Event-ID: at once without tags.
          this._tagsRefused = true;
          attempt.reopen = true;
          attempt.refusedAsked = true;
        }
        return;
      }
      // Every stream asks ?partial=1 again: the next one may reach an upgraded gateway.
      this._partialRefused = false;
      attempt.live = true;
      attempt.openedAt = this._now();
      // The gateway subscribes the stream's projects (up to 8 at a time, one after the other
      // before): each `subscribed` is due, as after a WebSocket subscribe (keepalive comments
      // are no answer).
      for (const sub of this._subs.values()) this._asking(attempt, sub);
      // Not live yet: a proxy that buffers response bodies passes the headers and holds the rest.
      // Until the stream answers (_proveSse), polling goes on, or starts one pollInterval from now
      // (its rounds wait while the stream holds polls).
      if (!this._polling) this._startPolling(this.options.pollInterval);
      this._updateState();
      watch();
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const parser = new SseParser();
      let progress = 0; // bytes since the idle timer was last restarted
      for (;;) {
        const { done, value } = await reader.read();
        if (done || this._sse !== attempt) break;
        const lines = parser.lines;
        const items = parser.feed(decoder.decode(value, { stream: true }));
        // Alive when lines arrive (a keepalive comment is one), or SSE_PROGRESS_BYTES of a line
        // still arriving: a big event over a slow link (1 MiB at 20 KB/s) takes longer than
        // sseIdleTimeout, and cut, its replay would be as slow, for ever. A stream trickling the
        // bytes of a line that never ends slower than that does not look alive (and faster, it
        // meets MAX_EVENT_LENGTH).
        progress += value.length;
        if (parser.lines !== lines || progress >= SSE_PROGRESS_BYTES) {
          progress = 0;
          watch();
        }
        for (const item of items) {
          if (this._sse !== attempt || attempt.stale) break;
          this._onSseEvent(attempt, item);
          if (attempt.reopenDue) this._ssePlannedReopen(attempt);
        }
        if (attempt.stale) break; // ended: the next stream resumes from where polling got
      }
    } catch (error) {
      if (this._sse === attempt && !attempt.reopen && this._gaveUp !== attempt) this._reportSseFailed(attempt, error);
    } finally {
      this._clearTimeout(idle);
      this._clearTimeout(holdTimer);
      attempt.controller.abort(); // a stream given up on (e.g. an event too long) is closed too
      this._sseEnded(attempt);
    }
  }

  /** Polls wait (a round under way is dropped, no round starts) while the stream holds them;
   * polling stays on, and so does the `polling` state (_pollOk): the stream has not answered. */
  _holdPolls() {
    this._pollGeneration += 1;
    this._clearTimeout(this._pollTimer);
    this._pollTimer = null;
    this._pollDeferred = false;
  }

  /** Whether polls wait for the current stream's first answer. */
  _pollsHeld() {
    return this._sse !== null && this._sse.holdsPolls;
  }

  /** `attempt` holds polls no longer (it answered, ended, or took connectTimeout): they go on. */
  _releasePolls(attempt) {
    if (!attempt.holdsPolls) return;
    attempt.holdsPolls = false;
    if (this._polling && !this._pollsHeld()) this._pollSoon();
  }

  _onSseEvent(attempt, item) {
    let message;
    try {
      message = JSON.parse(item.data);
    } catch {
      this._reportError({ code: "invalid_frame", message: "gateway sent an SSE event that is not JSON" });
      return;
    }
    if (!message || typeof message !== "object") return;
    if (!attempt.proven && SSE_ANSWERS.has(item.event) && attempt.asked.has(message.project_id) && !this._proveSse(attempt)) return;
    switch (item.event) {
      case "message":
        if (Number.isSafeInteger(message.seq) && Number.isSafeInteger(message.project_id)) this._onEvent(message, "sse", sseOrigin(item, message));
        return;
      case "subscribed":
        // With ?presence=1 the project's presence read follows: `presence`, or `unavailable` if
        // it fails (other projects' answers may come between: the gateway subscribes up to 8 of
        // a stream's projects at a time).
        if (attempt.presence && this._subs.has(message.project_id)) attempt.presenceDue.add(message.project_id);
        this._onSubscribed(message, attempt); // (the project's SSE failures start over)
        return this._sseReopensSettled(attempt);
      case "resync_required":
        return this._onResyncRequired(message, attempt);
      case "authenticated":
        return this._scheduleSseRefresh(message);
      case "error":
        this._reportError({ code: message.code, message: message.message, projectId: message.project_id });
        if (message.code === "unavailable" && message.ended !== true && attempt.presenceDue.delete(message.project_id)) {
          // Only the project's presence read failed: the stream goes on, its events flow.
          return this._ssePresenceFailed(attempt, this._subs.get(message.project_id));
        }
        // Any other error naming a project: its subscribe refused, its subscription ended
        // (`ended`). The stream goes on for its other projects (a gateway from before that, or
        // one left with no project, closes it: 1011, and _sseEnded resumes every project).
        if (message.project_id != null) this._sseSubscriptionFailed(attempt, message.project_id);
        return;
      case "presence":
      case "presence_diff":
        if (message.type !== item.event) return;
        if (message.type === "presence") {
          attempt.presenceDue.delete(message.project_id);
          attempt.presenceWanted.delete(message.project_id);
          // Every presence the stream asked was read: presence is back, reopens for it start over.
          this._sseReopensSettled(attempt);
        }
        return this._onPresence(message);
      case "close":
        attempt.closeCode = message.code;
        return;
      default:
        return;
    }
  }

  /**
   * The project's presence read on stream `attempt` failed (docs/browser.md, the error table):
   * its listeners get null if they had a list (a stale one: no diff will come), and presence is
   * asked again the only way a stream can, by a planned reopen (every project resumed from its
   * cursor), after presence's backoff delay: the project's presenceRetry, grown by each failed
   * read and reset by a `presence` only, as on the WebSocket. One reopen for all the projects
   * failing on the stream, at the shortest of their delays, and no sooner than the reopens' own
   * backoff (_ssePresenceReopens: grown by each, reset by a stream reading every presence it
   * asked, or by the WebSocket taking over, see _stopSse): a reopen reads every project's presence again, and a read that succeeded before may
   * fail on it, its delay started over (a flaky presence store, projects failing by turns). None
   * if the stream ends first or is ending (a close frame came: the next one asks presence
   * anyway), or the WebSocket takes over. The same planned reopen tries again a project whose
   * subscription failed on the stream (_sseSubscriptionFailed). While presence keeps failing, a stream is
   * reopened at most once per delay, which grows to backoff.max.
   */
  _ssePresenceFailed(attempt, sub) {
    if (!sub) return;
    this._presenceUnknown(sub);
    sub.presenceRetry += 1;
    if (sub.presenceHandlers.size === 0) return;
    attempt.presenceFailed = true;
    this._sseReopenLater(attempt, sub.presenceRetry);
  }

  /**
   * The subscription of project `projectId` on stream `attempt` failed: its subscribe was refused
   * (Redis did not answer, the project's data in Redis is unreadable) or the gateway ended it
   * (`ended`: its data turned unreadable). A stream cannot subscribe again, but the gateway goes
   * on with its other projects (docs/protocol.md, "Server-Sent Events"): garbage in one project's
   * keys must not take the others off the stream. So the stream stays live for them; the project
   * alone is polled (_sseCarries, from its cursor: nothing lost, its events placed by seq as
   * any), its presence unknown; and it is tried live again by a planned reopen (every project
   * resumed from its cursor), after the project's backoff delay, grown by each failure in a
   * row and reset by its `subscribed` (the machinery of a failed presence read: one reopen for
   * all that wait, _sseReopenLater). A gateway from before this, or one whose stream is left
   * with no project, closes it (1011) right after: it ends as before (_sseEnded, every project
   * polled, the stream reopened on the SSE backoff), the planned reopen dropped.
   */
  _sseSubscriptionFailed(attempt, projectId) {
    this._answered(attempt, projectId);
    const sub = this._subs.get(projectId);
    if (!sub || attempt.failed.has(projectId) || !attempt.asked.has(projectId)) return;
    attempt.failed.add(projectId);
    attempt.presenceDue.delete(projectId);
    this._presenceUnknown(sub); // (no diff of it comes on this stream any more)
    sub.sseFailures += 1;
    // Polled from now: at once on a stream that answered (the failed projects alone), else
    // polling starts for it. Not at once on one that has not answered yet: every project is
    // polled until it does (a proxy may be buffering it), and a poll moving another project's
    // cursor now would make the stream's coming answer for it stale (the stream ended unread,
    // the next on the SSE backoff); its first answer polls the failed ones at once (_proveSse),
    // and until then polling goes on its schedule, as when the stream opened.
    if (attempt.proven) {
      if (this._polling) this._pollSoon();
      else this._startPolling(0);
    } else if (!this._polling) this._startPolling(this.options.pollInterval);
    this._sseReopenLater(attempt, sub.sseFailures);
  }

  /** A planned reopen of stream `attempt`, after the backoff delay of the `failures`-th failure
   * in a row (a presence read's, a subscription's), and no sooner than the reopens' own backoff
   * (_ssePresenceReopens); one for all that wait on the stream, at the shortest of their delays. */
  _sseReopenLater(attempt, failures) {
    const delay = Math.max(backoffDelay(failures - 1, this.options.backoff, this._random), backoffDelay(this._ssePresenceReopens, this.options.backoff, this._random));
    if (attempt.reopenTimer !== null && attempt.reopenAt <= this._now() + delay) return;
    this._clearTimeout(attempt.reopenTimer);
    attempt.reopenAt = this._now() + delay;
    attempt.reopenTimer = this._setTimeout(() => {
      attempt.reopenTimer = null;
      attempt.reopenDue = true;
      this._ssePlannedReopen(attempt);
    }, delay);
  }

  /** The planned reopens start over once a stream read every presence it asked and subscribed
   * every project it asked (none failed, none waited on). */
  _sseReopensSettled(attempt) {
    if (attempt.presenceWanted.size > 0 || attempt.presenceFailed || attempt.failed.size > 0) return;
    const answers = this._answers.get(attempt);
    if (!answers || answers.asked.size === 0) this._ssePresenceReopens = 0;
  }

  /** Whether the live stream carries project `sub` (it answered, and the project's subscription
   * on it did not fail): polling leaves it alone. */
  _sseCarries(sub) {
    const attempt = this._sse;
    return attempt !== null && attempt.proven && this._sseLive && attempt.asked.has(sub.projectId) && !attempt.failed.has(sub.projectId);
  }

  /**
   * The reopen asking presence again on stream `attempt` is due: made now, unless the gateway is
   * still subscribing the stream's projects (up to 8 at a time, each waiting for its presence
   * read, up to its --subscribe-timeout when presence's Redis does not answer): cut then, the
   * projects after them would never be subscribed once the reads outlast the delay, their events
   * not carried (nothing polls them). Then it is made when the last `subscribed` comes (see
   * _connectSse; the bound on a subscribe's answer ends a stream that never says it). The last
   * project's own presence read is not waited for: nothing else may come (a gateway need not
   * answer a read it dropped), and the next stream reads it again.
   */
  _ssePlannedReopen(attempt) {
    // (A close frame come: the gateway is ending the stream, on the SSE rung's terms, 1011 on
    // its backoff: a reopen now would open the next one at once.)
    if (this._sse !== attempt || this._wsLive || this._closed || attempt.closeCode !== null) return;
    const answers = this._answers.get(attempt);
    if (answers && answers.asked.size > 0) return;
    attempt.reopenDue = false;
    this._ssePresenceReopens = Math.min(this._ssePresenceReopens + 1, 60);
    this._reopenSse(); // (polls of the failed projects wait for its first answer: _sseEnded)
  }

  /**
   * The stream's first answer for one of its projects (one of their events, or a `subscribed` or
   * `resync_required` naming one; see SSE_ANSWERS): it delivers, so it is live and polling stops. The
   * `retry:` line the gateway writes with the response head, keepalive comments and
   * `authenticated` do not count: a buffering proxy may pass the first, a gateway whose
   * subscribes are stuck still sends the others. When polling has moved a project's cursor since
   * the stream asked (its answer is for a cursor left behind: a `subscribed` naming a top behind
   * the cursor would look like a history that moved back), the stream is ended unread, `stale`,
   * and the next one, on the SSE backoff, resumes from the cursor polling reached; polling goes
   * on meanwhile, and stops moving the cursors while that next stream is unanswered (it holds
   * polls, see _connectSse), so its answer cannot be stale too. Returns whether the stream is live.
   */
  _proveSse(attempt) {
    for (const [projectId, { sub, mark }] of attempt.asked) {
      if (this._subs.get(projectId) === sub && cursorMark(sub.cursor) !== mark) {
        attempt.stale = true;
        this._nextStreamHold = this.options.connectTimeout;
        return false;
      }
    }
    attempt.proven = true;
    attempt.holdsPolls = false; // (polling stops)
    this._sseLive = true;
    this._everConnected = true;
    // (On for its failed projects alone, if any: _sseCarries.) A round under way is dropped all
    // the same, as when polling stops: a poll of a project the stream carries, answered after
    // this, would move its cursor past the one the stream asked from, and the stream's
    // `subscribed` for it, a top read before, would look like a history that moved back (a
    // reload). The next round polls the failed projects alone.
    if (attempt.failed.size === 0) this._stopPolling();
    else if (this._polling) {
      this._pollGeneration += 1; // (its answers are ignored)
      if (this._pollAbort) this._pollAbort.abort();
      this._pollAbort = null;
      this._pollSoon();
    }
    this._updateState();
    return true;
  }

  /** Whether `conn` is an SSE stream that has answered nothing at all (perhaps held by a proxy
   * buffering response bodies). */
  _silentStream(conn) {
    return conn === this._sse && !conn.proven && conn.failed.size === 0;
  }

  /** What a silent stream given up on says, whichever bound gave it up. */
  _silentStreamMessage(projectId, ms) {
    return `the SSE stream answered nothing for project ${projectId} within ${ms} ms (a proxy buffering it?): polling meanwhile, the stream retried on its backoff`;
  }

  /**
   * The stream broke or was cut. Cut by sseIdleTimeout before it answered anything (no byte of
   * its body came: the subscribe bound, stretched past sseIdleTimeout after streams given up in
   * a row, was not reached first), it is reported as any silent stream is, `subscribe_timeout`,
   * so that every such stream says the same thing; cut idle after it answered, it says so
   * instead of the abort's "signal is aborted without reason".
   */
  _reportSseFailed(attempt, error) {
    const answers = this._answers.get(attempt);
    const waiting = answers ? Array.from(answers.asked.keys()) : [];
    if (attempt.idle && this._silentStream(attempt) && waiting.length > 0) {
      this._reportError({ code: "subscribe_timeout", message: this._silentStreamMessage(waiting[0], this.options.sseIdleTimeout), projectId: waiting[0] });
    } else if (attempt.idle) {
      this._reportError({ code: "sse_failed", message: `the SSE stream completed no line within ${this.options.sseIdleTimeout} ms: reopening`, error });
    } else {
      this._reportError({ code: "sse_failed", message: describe(error), error });
    }
  }

  /** A stream cannot refresh its token in-band: open the next one with a new token before this
   * one's expires (docs/protocol.md, "Server-Sent Events"). */
  _scheduleSseRefresh(message) {
    this._clearTimeout(this._sseRefreshTimer);
    this._sseRefreshTimer = null;
    if (typeof this.options.token !== "function" || !this._token) return;
    const claims = decodeTokenClaims(this._token.value) || {};
    const delay = refreshDelay({
      iat: claims.iat,
      exp: claims.exp,
      expiresAt: message.expires_at,
      obtainedAt: this._token.obtainedAt,
      now: this._now(),
    });
    if (delay !== null) {
      this._sseRefreshTimer = this._setTimeout(() => {
        this._token = null; // the next stream asks for a new one
        this._reopenSse();
      }, delay);
    }
  }

  _sseEnded(attempt) {
    this._clearTimeout(attempt.reopenTimer); // (the next stream asks presence anyway)
    attempt.reopenTimer = null;
    if (this._sse !== attempt) return;
    this._sse = null;
    this._sseLive = false;
    this._forgetAnswers(attempt);
    const gaveUp = this._gaveUp === attempt;
    if (gaveUp) this._gaveUp = null;
    this._clearTimeout(this._sseRefreshTimer);
    this._sseRefreshTimer = null;
    if (this._closed || this._wsLive) {
      this._updateState();
      return;
    }
    // Given up on for not answering a subscribe: up, not stable (the backoff keeps growing).
    if (this._sseHealth.isStable(this._now(), { proven: attempt.proven, openedAt: attempt.openedAt, gaveUp })) this._sseHealth.wasStable();
    if (closeAction(attempt.closeCode).renewToken) this._token = null;
    const next = this._sseHealth.nextStream(attempt);
    if (next.open === "reopen") {
      // (Not for nothing: the last project was unsubscribed; subscribe() opens the next one.)
      // A planned reopen of a stream that delivered (a project added, a token about to expire,
      // a gap) stays live meanwhile: the next stream takes the same path, and showing it as a
      // loss blinked "reconnecting" at every token refresh. Should the next one fail or never
      // answer, it ends as any other (_sseEnded: not live, polling).
      if (this._subs.size > 0) {
        // (A stream refused for what it asked, a gateway from before ?partial=1 or tags, passes
        // on the liveness of the one it replaced: every planned reopen asks partial again, and
        // the 400 of such a gateway blinked "reconnecting" at each.)
        this._sseLive = attempt.proven || (attempt.refusedAsked && attempt.passedLive);
        // A stream that held polls passes the hold on (the same path, the cursors unmoved since),
        // what is left of it: reopened again and again (presence or projects changing more often
        // than connectTimeout), a hold begun afresh each time would poll nothing for as long.
        // (A wall clock stepped back cannot make it longer than connectTimeout.)
        if (attempt.holdsPolls) this._nextStreamHold = Math.min(this.options.connectTimeout, Math.max(0, attempt.holdEndsAt - this._now()));
        // Polling runs on for projects whose subscription failed on it: any reopen (the planned
        // one trying them live again, a project added, a token about to expire) holds their
        // polls until the next stream answers, so that its answer is not for a cursor they moved
        // meanwhile (stale: that stream ended unread, the next one on the SSE backoff, every
        // project polled meanwhile); see _connectSse.
        else if (attempt.failed.size > 0 && this._polling) this._nextStreamHold = this.options.connectTimeout;
        this._connectSse();
      }
    } else if (next.open === "prompt") {
      // Draining (1012), slow consumer (4008), token expired (4002): resume at once, jittered;
      // once until a stream is stable (as the WebSocket's, see _onSocketClosed). Polls running on
      // for projects whose subscription failed on it wait for the next stream's first answer,
      // as for a reopen (above): else that answer could be stale, and the stream ended unread.
      if (attempt.failed.size > 0 && this._polling) this._nextStreamHold = this.options.connectTimeout;
      this._sseRetryTimer = this._setTimeout(() => {
        this._sseRetryTimer = null;
        if (!this._wsLive && !this._closed) this._connectSse();
      }, Math.round(this._random() * this.options.promptDelayMax));
    } else {
      // The stream could not open, or broke: poll meanwhile (at once, also when the first round
      // was put off for a stream that opened: it will not answer now), and try SSE again on its
      // backoff, or after the refusal's Retry-After when that is longer (a full gateway asks 5 s).
      if (this._pollDeferred) this._pollSoon();
      else this._startPolling();
      this._sseRetryTimer = this._setTimeout(() => {
        this._sseRetryTimer = null;
        this._startSse();
      }, this._offlineDelay(next.delay));
    }
    this._releasePolls(attempt);
    this._updateState();
  }

  // --- the bound on a subscribe's answer ----------------------------------------------------------

  /** A subscribe of `sub` goes out now on `conn` (the WebSocket, or an SSE stream as it opens). */
  _asking(conn, sub) {
    let answers = this._answers.get(conn);
    if (!answers) {
      const kind = conn === this._ws ? "websocket" : "sse";
      answers = answersOf(conn, kind, this._now(), this._stretchOf(kind));
      this._answers.set(conn, answers);
    } else if (answers.asked.size === 0) {
      // Nothing waited on: the stretch as it is now, not as at the connection's first subscribe
      // (since answered at once, or decayed). A connection answering everything fast after a
      // run of give-ups otherwise waited 16 times connectTimeout on a later stuck subscribe.
      answers.stretch = this._stretchOf(answers.kind);
    }
    answers.asked.set(sub.projectId, { sub, at: this._answersNow(answers) });
    if (answers.timer === null) answers.timer = this._setTimeout(() => this._checkAnswers(conn), this.options.connectTimeout);
  }

  /** A frame on `conn` answering the project's subscribe in part (its replay, a resync_required). */
  _heard(conn, projectId) {
    const answers = this._answers.get(conn);
    if (answers && answers.asked.has(projectId)) answers.progressAt = this._answersNow(answers);
  }

  /** Every subscribe of `conn` is read from now (the WebSocket got live). */
  _heardAll(conn) {
    const answers = this._answers.get(conn);
    if (answers && answers.asked.size > 0) answers.progressAt = this._answersNow(answers);
  }

  /** The project's subscribe on `conn` is answered (`subscribed`, an error). */
  _answered(conn, projectId) {
    const answers = this._answers.get(conn);
    const entry = answers && answers.asked.get(projectId);
    if (!entry) return;
    answers.asked.delete(projectId);
    answers.progressAt = this._answersNow(answers);
    // Every subscribe of a connection answered, each within connectTimeout: its kind's bound is back.
    if (answers.progressAt - entry.at > this.options.connectTimeout) answers.slow = true;
    else if (answers.asked.size === 0 && !answers.slow) this._answerBounds[answers.kind].answeredInTime();
    if (answers.asked.size === 0 && conn === this._ws) this._proveSocket();
  }

  /** The stretch of `kind`'s bound for a connection asking now (decayed: see _answerBounds). It
   * is taken by a connection asking with nothing waited on: its own wait does not shrink it. */
  _stretchOf(kind) {
    return this._answerBounds[kind].factor(this._now());
  }

  /**
   * The time for the bound on the subscribes' `answers`. `now` is the wall clock, while the timers
   * wait real time: when the clock is found set back (NTP, the user) since it was last read
   * here, the times taken before are moved back by as much, so a bound is not stretched by the
   * step (a subscribe left unanswered for an hour after the clock went back an hour). What part
   * of that was real time is unknown: a wait may count once more (twice connectTimeout at most).
   * A step forward can only end a wait early: one reconnect, which resumes from the cursors.
   */
  _answersNow(answers) {
    const now = this._now();
    const step = now - answers.seenAt;
    if (step < 0) {
      answers.progressAt += step;
      for (const entry of answers.asked.values()) entry.at += step;
    }
    answers.seenAt = now;
    return now;
  }

  /** `conn` is gone: what it was asked is never answered (the next connection asks again); the
   * other connection's bound (an SSE stream live while a WebSocket attempt failed) stays. */
  _forgetAnswers(conn) {
    const answers = this._answers.get(conn);
    if (!answers) return;
    this._clearTimeout(answers.timer);
    this._answers.delete(conn);
  }

  /**
   * The timer of the bound on a subscribe's answer. A gateway whose message handling is stuck
   * (its WebSocket library answers pings by itself, an SSE stream's keepalives go on, and the
   * live events of other projects may keep flowing) would leave a subscribe unanswered for ever:
   * the project silent, its gap repairs on hold, nothing said. So a subscribe is given
   * connectTimeout from when it was sent, pushed back by every frame answering it or a subscribe
   * sent before it: the replay comes before `subscribed`, and the gateway handles up to 8 of a
   * connection's subscribes at a time (each may wait for Redis up to its --subscribe-timeout;
   * one before that, one after the other), so later ones may wait for earlier ones. An
   * event past a gap does not count (a live one: it comes whether or not the subscribe is
   * handled). When the bound passes, it is reported (`subscribe_timeout`) and the connection is
   * given up: reconnected on the backoff (not counted as stable), every project resuming from
   * its cursor; a subscribe sent again on it would wait behind the stuck one. The timer is
   * lazy: pushing the bound back is a store; when it fires it checks and sets itself again.
   */
  _checkAnswers(conn) {
    const answers = this._answers.get(conn);
    if (!answers) return;
    answers.timer = null;
    const now = this._answersNow(answers);
    const bound = this.options.connectTimeout * answers.stretch;
    let earliest = null;
    for (const [projectId, { sub, at }] of answers.asked) {
      if (this._subs.get(projectId) !== sub) {
        answers.asked.delete(projectId); // unsubscribed (perhaps subscribed again): not waiting
        if (answers.asked.size === 0 && conn === this._ws) this._proveSocket();
        continue;
      }
      const deadline = Math.max(at, answers.progressAt) + bound;
      if (deadline <= now) {
        // A stream that never answered at all may be held by a proxy buffering response bodies.
        this._reportError({
          code: "subscribe_timeout",
          message: this._silentStream(conn)
            ? this._silentStreamMessage(projectId, bound)
            : `the gateway did not answer the subscribe of project ${projectId} within ${bound} ms: reconnecting`,
          projectId,
        });
        this._gaveUp = conn;
        this._answerBounds[answers.kind].gaveUp(now, answers.stretch);
        if (conn === this._ws) this._dropSocket(CloseCode.ABNORMAL, "no answer to a subscribe", true);
        else if (conn === this._sse) conn.controller.abort(); // _sseEnded reopens it on the backoff
        return;
      }
      earliest = earliest === null ? deadline : Math.min(earliest, deadline);
    }
    if (earliest !== null) answers.timer = this._setTimeout(() => this._checkAnswers(conn), earliest - now);
  }

  // --- polling fallback --------------------------------------------------------------------------

  /**
   * The project's subscribe on the live WebSocket was answered stale (a poll moved its cursor
   * before the answer came: a gateway slower to answer than pollInterval, on a busy project) and
   * goes again from the polled cursor. Were its polls to go on, that answer would be as stale,
   * and the next, for as long as the gateway stays slow: a resubscribe (and a history replay on
   * the gateway) at every answer, and while any project's is outstanding the WebSocket is not
   * proven and polling never stops. So the project's polls wait for that answer: nothing moves
   * its cursor meanwhile (a poll of it under way is dropped, its answer moves nothing), so the
   * answer is for the cursor it asked from, judged as any (a new epoch included), and its replay
   * carries what the polls would have delivered. For connectTimeout at most: a gateway that does
   * not answer by then (its bound stretched after give-ups) leaves the project polled again,
   * and the bound on the answer gives the connection up as before. (The SSE stream after a
   * stale one holds polls alike, _connectSse.)
   */
  _holdPollsOf(sub) {
    this._clearTimeout(sub.pollHoldTimer);
    sub.pollHoldTimer = this._setTimeout(() => {
      sub.pollHoldTimer = null;
      if (this._polling && this._subs.get(sub.projectId) === sub) this._pollSoon();
    }, this.options.connectTimeout);
  }

  /** The project's polls go on (its subscribe answered, the WebSocket gone, the project dropped). */
  _releasePollsOf(sub) {
    this._clearTimeout(sub.pollHoldTimer);
    sub.pollHoldTimer = null;
  }

  /** Start polling: its first round at once, or after `delay` ms. */
  _startPolling(delay = 0) {
    if (this._polling || this._closed || !this._fetch) return;
    this._polling = true;
    this._pollGeneration += 1;
    if (delay <= 0) return this._pollSoon();
    this._clearTimeout(this._pollTimer);
    this._pollDeferred = true;
    this._pollTimer = this._setTimeout(() => {
      this._pollTimer = null;
      this._pollSoon();
    }, delay);
  }

  _stopPolling() {
    this._polling = false;
    this._pollDeferred = false;
    this._pollOk = false;
    for (const sub of this._subs.values()) this._releasePollsOf(sub); // (nothing left to hold)
    this._pollGeneration += 1; // responses of the old generation are ignored
    this._clearTimeout(this._pollTimer);
    this._pollTimer = null;
    // A request under way is not left to hang for up to pollTimeout (its answer would be
    // ignored): the page holds no connection, and no timer, for a transport it left.
    if (this._pollAbort) this._pollAbort.abort();
    this._pollAbort = null;
  }

  /**
   * How long (ms, 0: none) the next round still waits for the gateway's Retry-After. The wall
   * clock stepped back since last asked moves the "not before" back by as much (as FramePacer
   * does): a step never adds its size to the wait.
   */
  _pollWait() {
    const now = this._now();
    if (now < this._pollClockSeen) this._pollNotBefore -= this._pollClockSeen - now;
    this._pollClockSeen = now;
    return Math.max(0, this._pollNotBefore - now);
  }

  /** A round refused with Retry-After (ms): no round before that long from now, whoever asks. */
  _pollRefused(retryAfter) {
    this._pollWait(); // (observes the clock)
    this._pollNotBefore = Math.max(this._pollNotBefore, this._pollClockSeen + retryAfter);
  }

  /**
   * A round at once (a hold ended, back online...): after the round under way if one is, and
   * never before the Retry-After a refused round was given (_pollWait): asked early, the
   * gateway that is shedding load would refuse it again.
   */
  _pollSoon() {
    this._pollDeferred = false;
    if (this._pollRunning) {
      // After it (a round of a stopped generation ends early; a put-off first round's timer
      // would hold this one back: _pollAll schedules the next only when no timer is pending).
      this._pollAgain = true;
      this._clearTimeout(this._pollTimer);
      this._pollTimer = null;
      return;
    }
    this._clearTimeout(this._pollTimer);
    this._pollTimer = this._setTimeout(() => this._pollAll(), this._pollWait());
  }

  async _pollAll() {
    this._pollTimer = null;
    // (Held by a stream: _releasePolls asks for the next round.)
    if (!this._polling || this._closed || this._pollsHeld()) return;
    const generation = this._pollGeneration;
    this._pollRunning = true;
    this._pollAgain = false;
    const subs = Array.from(this._subs.values());
    let ok = true;
    let polled = 0;
    try {
      this._pollRetryAfter = 0;
      for (const sub of subs) {
        if (generation !== this._pollGeneration) break;
        if (sub.pollHoldTimer !== null) continue; // waits for its subscribe's answer (_holdPollsOf)
        if (this._wsHealth.proven && !sub.refusedForLimit) continue; // the WebSocket carries it
        if (this._sseCarries(sub)) continue; // (a project whose subscription failed on it is polled)
        polled += 1;
        if (!(await this._pollProject(sub, generation))) ok = false;
        // Refused with Retry-After (a draining or full gateway): the other projects would be
        // too; the round ends, and the next waits at least as long as asked.
        if (this._pollRetryAfter > 0) break;
      }
    } finally {
      this._pollRunning = false;
    }
    if (generation !== this._pollGeneration) {
      // Polling was stopped (WebSocket got live) and perhaps restarted while this round ran.
      if (this._polling && this._pollAgain && !this._pollTimer) {
        this._pollAgain = false;
        this._pollTimer = this._setTimeout(() => this._pollAll(), this._pollWait());
      }
      return;
    }
    // With nothing polled (nothing subscribed, or all held) no request judges the transport.
    if (polled > 0) this._pollOk = ok;
    this._updateState();
    let delay = Math.max(this._pollAgain ? 0 : this.options.pollInterval, this._pollWait());
    if (!ok) delay = this._offlineDelay(delay);
    this._pollTimer = this._setTimeout(() => this._pollAll(), delay);
  }

  /** One project, following `more` until caught up. Returns false when the poll failed. */
  async _pollProject(sub, generation) {
    for (let round = 0; round < 50; round += 1) {
      let response;
      let body;
      let query;
      let position;
      if (generation !== this._pollGeneration) return true; // stopped meanwhile (following `more`)
      if (sub.pollHoldTimer !== null) return true; // held meanwhile (_holdPollsOf)
      const controller = typeof AbortController === "function" ? new AbortController() : null;
      this._pollAbort = controller;
      let timedOut = false;
      const deadline = controller
        ? this._setTimeout(() => {
            timedOut = true;
            controller.abort();
          }, this.options.pollTimeout)
        : null;
      try {
        const headers = { Accept: "application/json" };
        if (this._hasAuth) headers.Authorization = `Bearer ${await this._getToken(false)}`;
        query = sub.cursor.pollQuery({ tags: !this._tagsRefused });
        position = sub.cursor.pollQuery({ tags: false });
        // After an answer too long, smaller pages until caught up (an event is at most 1 MiB).
        const limit = query && sub.pollLimit !== null ? `&limit=${sub.pollLimit}` : "";
        const url = `${this.httpUrl}/v1/projects/${sub.projectId}/events${query}${limit}`;
        const init = { headers, cache: "no-store" };
        if (controller) init.signal = controller.signal;
        response = await this._fetch(url, init);
        if (response.status === 401) this._token = null; // re-asked on the next round
        if (!response.ok) {
          this._pollRetryAfter = retryAfterDelay(response, this.options.backoff.max);
          if (this._pollRetryAfter > 0) this._pollRefused(this._pollRetryAfter);
          const detail = await errorDetail(response);
          this._reportError({ code: `poll_http_${response.status}`, message: detail, projectId: sub.projectId });
          if (response.status === 400 && query.includes("&tag=") && !this._tagsRefused) {
            // A gateway from before cursor tags refuses the `tag` parameter: at once without it.
            this._tagsRefused = true;
            continue;
          }
          return response.status === 403; // forbidden is an answer, not a transport failure
        }
        try {
          body = await readJson(response, EventBus.MAX_POLL_LENGTH);
        } catch (error) {
          // Too long, or too slow to arrive within pollTimeout (big events over a slow link: asked
          // for again in full, it would be as slow, for ever): ask for pages of a quarter the
          // size next time (100, 25, 6, 1).
          if (((error && error.tooLong) || timedOut) && query) sub.pollLimit = Math.max(1, Math.floor((sub.pollLimit ?? DEFAULT_POLL_LIMIT) / 4));
          throw error;
        }
        if (!isPollAnswer(body)) throw new Error("eventbus: the gateway's poll answer is not {epoch, seq, events, resync_required}");
      } catch (error) {
        if (generation !== this._pollGeneration) return true; // aborted by _stopPolling: no failure
        this._reportError({ code: "poll_failed", message: describe(error), projectId: sub.projectId, error });
        return false;
      } finally {
        if (deadline !== null) this._clearTimeout(deadline);
        if (this._pollAbort === controller) this._pollAbort = null;
      }
      if (generation !== this._pollGeneration || this._subs.get(sub.projectId) !== sub) return true;
      // Held while this poll was under way: its answer moves nothing, so the subscribe's answer
      // is for the cursor it asked from (_holdPollsOf). It replays the same events.
      if (sub.pollHoldTimer !== null) return true;
      this._everConnected = true;
      // The WebSocket (a slot freed on it, a subscribe answered while polling runs on for
      // other projects) or an SSE stream moved the cursor while this poll was under way: the
      // answer is for the cursor left behind, and they deliver. Taken, its resync_required
      // would reload the application again and set the cursor back (the events after it,
      // delivered already, would come twice), and its events, of the epoch it asked in, would
      // be placed by seq alone in the one they reached. A next poll asks from there.
      if (sub.cursor.pollQuery({ tags: false }) !== position) return true;
      if (body.resync_required) {
        this._tagsKnown(body.resync_required);
        sub.cursor.beginResync(body.resync_required.epoch, body.resync_required.seq, tagOf(body.resync_required));
        sub.fallbackMoves += 1;
        this._runResync(sub);
        return true;
      }
      // The page's tag is that of the event to poll after next: its last event's, or (none) the
      // one at its seq. The text of an event inside the page is not at hand to hash.
      const pageTag = tagOf(body);
      this._tagsKnown(body);
      if (!sub.cursor.known) {
        // First contact by polling: same as a first `subscribed`.
        sub.cursor.beginResync(body.epoch, body.seq, pageTag);
        sub.fallbackMoves += 1;
        this._runResync(sub);
        return true;
      }
      const events = body.events ?? [];
      if (events.length === 0) sub.cursor.learnTag(body.epoch, body.seq, pageTag);
      let gap = null;
      for (const [index, event] of events.entries()) {
        // This project's answer speaks for this project only: another one's seq would move (and
        // later dedupe away) that project's real events.
        if ((event.project_id ?? sub.projectId) !== sub.projectId) continue;
        const origin = index === events.length - 1 && pageTag !== null ? { tag: pageTag } : null;
        const past = this._onEvent({ ...event, project_id: sub.projectId }, "polling", origin);
        if (past && !gap) gap = past;
      }
      if (gap) {
        // Asked for by the next poll (the cursor stopped before it), after the usual interval:
        // asking at once would poll a gateway that keeps answering with the gap in a busy loop.
        this._onGap(sub, gap, "polling");
        return true;
      }
      if (!body.more) sub.pollLimit = null; // caught up: the gateway's default page again
      if (!body.more || events.length === 0) return true;
      // Follow `more` only when this page moved the cursor (or what is held back): a held buffer
      // that overflowed while onResync is pending takes nothing more, and asking again would
      // fetch the same page up to 50 times a round. The gap is repaired when the reload ends.
      if (sub.cursor.pollQuery({ tags: false }) === position) return true;
    }
    return true;
  }

  // --- state -------------------------------------------------------------------------------------

  _updateState() {
    const next = computeState({
      closed: this._closed,
      online: this._isOnline(),
      websocketLive: this._wsLive,
      sseLive: this._sseLive,
      pollingOk: this._polling && this._pollOk,
      everConnected: this._everConnected,
    });
    const transport = this.transport;
    if (this._closed || next === State.POLLING || next === State.OFFLINE) this._forgetPresence();
    if (next === this._state && transport === this._reportedTransport) return;
    const previous = this._state;
    this._state = next;
    this._reportedTransport = transport;
    if (this.options.onStateChange) {
      try {
        // Called when the state or the live transport changes (e.g. "live" over SSE, then over
        // WebSocket): the third argument is the status, {state, transport}.
        this.options.onStateChange(next, previous, { state: next, transport });
      } catch (error) {
        this._reportError({ code: "handler_failed", message: describe(error), error });
      }
    }
  }

  _reportError(error) {
    this.lastError = error;
    if (this.options.onError) {
      try {
        this.options.onError(error);
      } catch {
        /* an error handler that throws has nowhere left to report to */
      }
    }
  }
}

/** The longest poll answer read, in characters (its body is read as a stream and given up past
 * it: a poll_failed): as long as the longest SSE event accepted. A page of big events that is
 * longer is asked for again in smaller pages. */
EventBus.MAX_POLL_LENGTH = 4 * 1024 * 1024;

/**
 * Open a connection to the gateway.
 *
 *   const bus = connect({ url: "wss://events.example.com/", token: () => fetchToken(), onResync });
 *   const unsubscribe = bus.subscribe(1, (event) => render(event));
 */
export function connect(options = {}) {
  return new EventBus(options);
}

export default connect;
