// TypeScript declarations of eventbus.js, the browser client of the eventbus gateway.
// Wire protocol: docs/protocol.md. Usage: docs/browser.md.

export declare const VERSION: string;

/** "live": events arrive live, over a WebSocket or an SSE stream that has answered (an open stream
 * that has not, perhaps held by a buffering proxy, leaves the state as it was, polling meanwhile). */
export type ConnectionState = "connecting" | "live" | "reconnecting" | "polling" | "offline";

/** How events currently arrive: WebSocket, Server-Sent Events, HTTP polling, or nothing yet. */
export type Transport = "websocket" | "sse" | "polling";

/** The third argument of onStateChange. */
export interface ConnectionStatus {
  state: ConnectionState;
  transport: Transport | null;
}

export declare const State: Readonly<{
  CONNECTING: "connecting";
  LIVE: "live";
  RECONNECTING: "reconnecting";
  POLLING: "polling";
  OFFLINE: "offline";
}>;

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  ABNORMAL: 1006;
  PROTOCOL_ERROR: 1002;
  INVALID_DATA: 1007;
  POLICY_VIOLATION: 1008;
  MESSAGE_TOO_BIG: 1009;
  INTERNAL_ERROR: 1011;
  SERVICE_RESTART: 1012;
  TRY_AGAIN_LATER: 1013;
  AUTH_FAILED: 4001;
  TOKEN_EXPIRED: 4002;
  TOKEN_REVOKED: 4003;
  SLOW_CONSUMER: 4008;
  TOO_MANY_ERRORS: 4009;
  TOO_MANY_REQUESTS: 4029;
}>;

// --- events of the contract (docs/contract.md), as relayed (with `seq`) ------------------------

export type BlockerType = "SYNC" | "ASYNC";
export type BlockerStatus = "PENDING" | "RESOLVED" | "EXPIRED";

export interface Blocker {
  id: number;
  agent_id: string;
  agent_name: string;
  task_id: number;
  task_title: string;
  blocker_type: BlockerType;
  question: string;
  status: BlockerStatus;
  /** RFC 3339, UTC ("...Z"). */
  created_at: string;
}

interface EventBase {
  project_id: number;
  /** The project's sequence number: grows by exactly 1 per event. */
  seq: number;
}

export interface BlockerCreatedEvent extends EventBase {
  type: "blocker_created";
  blocker: Blocker;
}

export interface BlockerResolvedEvent extends EventBase {
  type: "blocker_resolved";
  blocker_id: number;
  answer: string;
  resolved_at: string;
}

export interface AgentResumedEvent extends EventBase {
  type: "agent_resumed";
  agent_id: string;
  task_id: number;
  blocker_id: number;
  resumed_at: string;
}

export interface BlockerExpiredEvent extends EventBase {
  type: "blocker_expired";
  blocker_id: number;
  task_id: number;
  expired_at: string;
}

/** Every event type of the contract; other types (added later) arrive with the same base fields. */
export type ProjectEvent =
  | BlockerCreatedEvent
  | BlockerResolvedEvent
  | AgentResumedEvent
  | BlockerExpiredEvent;

// --- the client --------------------------------------------------------------------------------

export interface Cursor {
  epoch: string;
  seq: number;
  /** The tag of the event at `seq` (16 lowercase hex digits: docs/protocol.md, "Cursor tags"):
   * lets the gateway tell when that event was replaced (a Redis failover). Absent or null:
   * unknown, the cursor is unchecked. A malformed one is ignored. */
  tag?: string | null;
}

export interface EventBusError {
  /** A gateway error code (docs/protocol.md) or a client one: "poll_failed", "token_failed",
   * "token_refresh_failed", "auth_failed" (close 4001: the token was refused), "token_revoked"
   * (close 4003: the person's tokens were revoked; both reconnect with a new token, backed off),
   * "resync_failed", "resync_slow", "handler_failed", "closed", "invalid_frame",
   * "websocket_failed", "poll_http_<status>", "sse_failed", "sse_http_<status>",
   * "invalid_snapshot_cursor", "snapshot_cursor_ignored", "history_corrupt" (a gap still there
   * after two repairs from the same cursor: onResync runs, delivery continues after it),
   * "subscribe_timeout" (the gateway did not answer a subscribe within connectTimeout: the
   * connection, or SSE stream, is closed and made again on the backoff; an SSE stream that
   * answered nothing at all, given up after connectTimeout or cut after sseIdleTimeout without a
   * byte, may be held by a buffering proxy, and polling carries the events). */
  code: string;
  message?: string;
  projectId?: number;
  closeCode?: number;
  error?: unknown;
}

export interface BackoffOptions {
  /** First delay, ms (default 1000): 1 to 2147483647. */
  initial?: number;
  /** Largest delay, ms (default 30000): from `initial` to 2147483647. */
  max?: number;
  /** Growth per attempt (default 2): finite, at least 1. */
  factor?: number;
  /** Random spread, as a fraction of the delay (default 0.2 = +/-20%): 0 to 1. */
  jitter?: number;
}

/** A promise of a token is a fixed token (awaited once, never renewed): prefer the function. */
export type TokenSource = string | PromiseLike<string> | (() => string | Promise<string>);

/** The options of connect(). Checked when the client is made (checkOptions): an unknown name or
 * a value of the wrong type throws a TypeError, a number out of its bounds a RangeError, each
 * naming the option. An option given as undefined is one not given (its default), and so is
 * null (any false value) for url, httpUrl, backoff, the callbacks and the functions but WebSocket,
 * and null for websocket and sse. Times are ms;
 * a timer's is at most 2147483647 (a browser runs a longer one at once). */
export interface ConnectOptions {
  /** WebSocket URL of the gateway, e.g. "wss://events.example.com/". Default: this page's host. */
  url?: string | URL | null;
  /** HTTP base URL of the fallbacks (SSE: GET {httpUrl}/v1/projects/{id}/stream; polling:
   * GET {httpUrl}/v1/projects/{id}/events). Default: the origin of `url`. */
  httpUrl?: string | URL | null;
  /** The gateway token, or a function returning it (asked again on every reconnect, before
   * expiry, and after a 401/4001/4002/4003). Omit only for a gateway run with --no-auth. */
  token?: TokenSource | null;
  /** Reload the application's state of a project from its own API. Called on the first subscribe
   * and on every resync_required; events arriving meanwhile are held back and delivered after the
   * returned promise resolves. A rejected promise is retried with backoff. Resolve to the
   * snapshot's cursor (the position the reloaded state includes, e.g. from
   * publisher.outbox's snapshot helper) and the bus continues exactly after it: events at or
   * before it are dropped, the ones after it delivered once, asked for again if not held. */
  onResync?: ((projectId: number) => void | Cursor | null | Promise<void | Cursor | null>) | null;
  /** Called when the state or the live transport changes ("live" over SSE, then over
   * WebSocket: state and previous are both "live", status.transport says which). */
  onStateChange?: ((state: ConnectionState, previous: ConnectionState, status: ConnectionStatus) => void) | null;
  onError?: ((error: EventBusError) => void) | null;
  backoff?: BackoffOptions | null;
  /** ms a connection must stay up before the backoff starts over (default 10000; 0 to 2147483647). */
  stableAfter?: number;
  /** ms between polls while WebSocket cannot connect (default 10000; 1 to 2147483647). */
  pollInterval?: number;
  /** ms before an unanswered poll is abandoned and counted as failed (default 30000; 1 to
   * 2147483647); one whose answer was still arriving is asked for again in pages a quarter the size. */
  pollTimeout?: number;
  /** Failed WebSocket attempts before the fallbacks start: SSE, else polling (default 1; a whole
   * number from 1 up, or Infinity: never, WebSocket only while the browser has it). */
  pollAfterFailures?: number;
  /** false: WebSocket off; SSE (else polling) from the start (default true). */
  websocket?: boolean | null;
  /** false: no SSE; polling is the only fallback (default true). */
  sse?: boolean | null;
  /** ms without a completed line (not even a keepalive comment), nor 16 KiB of one still
   * arriving, before an SSE stream is reopened (45000; 1 to 2147483647). */
  sseIdleTimeout?: number;
  /** ms of silence before an application ping (default 25000; 1 to 2147483647). */
  pingInterval?: number;
  /** ms to wait for any frame after a ping before reconnecting (default 10000; 1 to 134217727,
   * a sixteenth of 2147483647); doubled (up to 16 times) for the next connections after such a
   * reconnect, until a ping is answered in time. */
  pongTimeout?: number;
  /** ms a handshake, or the token function, may take (default 10000; 1 to 134217727, as
   * pongTimeout: the bound on a subscribe's answer stretches alike); longer counts as a failure.
   * Also the bound on the gateway's answer to a subscribe (keep it above the gateway's
   * --subscribe-timeout, 5 s): see docs/browser.md, "Reconnection and close codes". */
  connectTimeout?: number;
  /** ms after which an onResync that has not settled is reported, once per call, as
   * `resync_slow` (default 30000; 1 to 2147483647); the project's events stay held until it settles. */
  resyncSlowAfter?: number;
  /** Upper bound of the random delay of a prompt reconnect (1012, 4008, 4002), ms (default 500;
   * 0 to 2147483647). */
  promptDelayMax?: number;
  /** At most one `activity` frame per project per this many ms, carrying the latest state
   * (default 1000; 0 to 2147483647, 0: unpaced): see docs/browser.md, "Presence". */
  activityInterval?: number;
  /** ms between frames sent again after the gateway's rate limit refused one (default 100; 1 to
   * 2147483647; doubled while they are refused again, up to backoff.max): see FramePacer. */
  resendInterval?: number;
  // Injection points for tests and non-browser runtimes.
  WebSocket?: typeof WebSocket | null;
  fetch?: typeof fetch | null;
  setTimeout?: ((fn: () => void, ms: number) => unknown) | null;
  clearTimeout?: ((handle: unknown) => void) | null;
  now?: (() => number) | null;
  random?: (() => number) | null;
  /** Whether the browser says it is online (default: navigator.onLine !== false). While it says
   * false, attempts are at most one per backoff.max (the first at once), never none. */
  isOnline?: (() => boolean) | null;
}

// --- presence (docs/presence.md) ----------------------------------------------------------------

export interface PresenceMember {
  /** The token's `sub`: one member per person, whatever the tabs and pods. */
  id: string;
  /** The token's `name` claim, or null. */
  name: string | null;
  /** The item on screen / being answered, of the tab that reported last. */
  viewing: number | null;
  answering: number | null;
  /** Unix ms when the member arrived (their earliest open tab). */
  since: number;
}

export interface PresenceChange {
  joined: PresenceMember[];
  left: string[];
  changed: PresenceMember[];
}

export interface Activity {
  viewing?: number | null;
  answering?: number | null;
}

/** One project's members: `load` a `presence` list, `apply` each `presence_diff`. */
export declare class PresenceTable {
  members: Map<string, PresenceMember>;
  load(members: PresenceMember[]): void;
  apply(diff: Partial<PresenceChange>): PresenceChange;
  /** Every member, sorted by id. */
  list(): PresenceMember[];
}

/** Whether a value is a snapshot cursor {epoch: 1 to 64 of [A-Za-z0-9_-], seq: integer >= 0}
 * (a `tag` is optional, and ignored when malformed). */
export declare function isCursor(value: unknown): value is Cursor;

/** SHA-1 of the bytes, as 40 lowercase hex digits (synchronous). */
export declare function sha1Hex(bytes: Uint8Array): string;

/** The tag of an event: the first 16 hex digits of SHA-1 over the UTF-8 bytes of its JSON text
 * exactly as received. */
export declare function eventTag(text: string): string;

export declare class EventBus {
  constructor(options?: ConnectOptions);
  readonly state: ConnectionState;
  readonly transport: Transport | null;
  /** Epoch-milliseconds of the next WebSocket attempt, or null. */
  readonly nextRetryAt: number | null;
  readonly lastError: EventBusError | null;
  /** The cursor of a subscribed project, or null before its first `subscribed`; its `tag` only
   * when known (hashed from the last event's text when asked for). */
  cursor(projectId: number): Cursor | null;
  /** Receive a project's events in order, once each. Returns the unsubscribe function. */
  subscribe(projectId: number, onEvent: (event: ProjectEvent) => void): () => void;
  /** Who is on the project's dashboards. `onChange` gets every member (sorted by id) after each
   * `presence` (change null) and `presence_diff`, and `null` once when presence becomes
   * unavailable (polling, offline, closed). Subscribes to the project if nothing else did.
   * Returns the function that removes this listener. */
  presence(
    projectId: number,
    onChange: (members: PresenceMember[] | null, change: PresenceChange | null) => void,
  ): () => void;
  /** The project's members, or null while presence is unknown. */
  members(projectId: number): PresenceMember[] | null;
  /** This tab's activity in a project (positive integer ids or null); sent over WebSocket, at
   * most one frame per project per `activityInterval` (the latest state), again after every
   * resubscribe, kept while on SSE or polling. */
  activity(projectId: number, activity?: Activity): void;
  /** Try the WebSocket now instead of waiting for the backoff. */
  reconnect(): void;
  /** Stop for good. */
  close(): void;
  /** The longest poll answer read, in characters (4 Mi): a longer one is a failed poll
   * (`poll_failed`), and the project is then polled in smaller pages until caught up. */
  static MAX_POLL_LENGTH: number;
}

export declare function connect(options?: ConnectOptions): EventBus;
export default connect;

// --- the pure logic, exported for tests and for applications that want the same policy -----

export declare const DEFAULTS: Readonly<{
  backoff: Readonly<Required<BackoffOptions>>;
  stableAfter: number;
  pollInterval: number;
  pollTimeout: number;
  pollAfterFailures: number;
  sse: boolean;
  sseIdleTimeout: number;
  pingInterval: number;
  pongTimeout: number;
  connectTimeout: number;
  resyncSlowAfter: number;
  promptDelayMax: number;
  activityInterval: number;
  resendInterval: number;
}>;

/** The options of connect() with the defaults filled in (`backoff` merged with DEFAULTS.backoff),
 * after checking every one (see ConnectOptions): throws a TypeError for an unknown name or a value
 * of the wrong type, a RangeError for a number out of its bounds, naming the option. */
export declare function checkOptions(
  options?: ConnectOptions,
): ConnectOptions & Omit<typeof DEFAULTS, "backoff"> & { backoff: Required<BackoffOptions> };

/** The connection-wide pacing of frames after `rate_limited` (one "not before" instant and one
 * queue of held frames, by key; times in ms on the caller's clock). */
export declare class FramePacer<T = unknown> {
  constructor(options?: { spacing?: number; maxSpacing?: number; fallbackDelay?: number });
  notBefore: number;
  spacing: number;
  readonly held: number;
  /** A new connection: nothing held, nothing to wait for. */
  reset(): void;
  /** Whether a frame may go out now (nothing held, no refusal asks to wait). */
  mayDirect(now: number): boolean;
  /** A frame was refused at `now`; `retryAfterMs`: the error's retry_after_ms (absent: an old
   * gateway, a delay of the pacer's own). */
  refused(now: number, retryAfterMs?: number | null): void;
  /** Hold `item` under `key` (a key already held keeps its place and takes the new item). */
  hold(key: string, item: T): void;
  drop(key: string): void;
  /** When the first held item is due, or null when none is held. Every method given a `now`
   * takes a clock stepped back since the last one as such: the wait keeps its length. */
  dueAt(now?: number): number | null;
  /** The first held item when due at `now` (removed), else null. */
  next(now: number): T | null;
  /** A held item went out at `now`: the next waits `spacing`. */
  resent(now: number): void;
}

/** A bound on a wait, in multiples of its configured length: doubled (at most `max`) after each
 * wait given up on, back to 1 after one met in time, and with `decayAfter` (ms) halved for every
 * decayAfter without a give-up. Times in ms on the caller's clock; a clock stepped back since the
 * last give-up waits one period from the new `now`. */
export declare class StretchedBound {
  constructor(options?: { max?: number; decayAfter?: number });
  readonly max: number;
  readonly decayAfter: number;
  stretch: number;
  stretchedAt: number | null;
  /** The stretch for a wait starting at `now` (decayed); at least 1. */
  factor(now: number): number;
  /** A wait that took stretch `taken` (default: the current one) was given up on at `now`. */
  gaveUp(now: number, taken?: number): void;
  /** A wait was met within the configured length: the stretch is back to 1. */
  answeredInTime(): void;
}

export declare function backoffDelay(
  attempt: number,
  options?: BackoffOptions,
  random?: () => number,
): number;

export declare class Backoff {
  constructor(options?: BackoffOptions, random?: () => number);
  attempt: number;
  next(): number;
  reset(): void;
}

/** The health of the WebSocket rung across its attempts: when to fall back, how long to wait
 * before the next attempt, whether a close may be resumed at once, whether a connection counted
 * as a success. Times in ms on the caller's clock. */
export declare class SocketHealth {
  constructor(options?: { stableAfter?: number; pollAfterFailures?: number; backoff?: Backoff });
  readonly stableAfter: number;
  readonly pollAfterFailures: number;
  readonly backoff: Backoff;
  failures: number;
  proven: boolean;
  prompted: boolean;
  attemptAt: number | null;
  liveAt: number | null;
  /** An attempt starts at `now`. */
  attempting(now: number): void;
  /** While offline: null when an attempt may go at `now`, else the ms to wait (at most `max`). */
  offlineWait(now: number, max: number): number | null;
  /** The connection got live at `now` (not proven yet). */
  live(now: number): void;
  /** Every subscribe answered: a success, failures cleared; false when already proven. */
  prove(): boolean;
  /** The connection is gone: the next one proves itself again. */
  ended(): void;
  /** What the connection ending at `now` was (nothing changes). */
  closedOutcome(now: number, facts: { wasLive: boolean; gaveUp: boolean }): { proven: boolean; stable: boolean };
  /** The connection that ended was stable: the backoff and the prompt reconnect start over. */
  wasStable(): void;
  /** Takes the one prompt reconnect allowed until a stable connection (false: already taken). */
  takePrompt(): boolean;
  /** An attempt ended: counted as failed unless `spared`. */
  attemptFailed(options?: { spared?: boolean }): void;
  /** Whether the attempts failed often enough to use the fallbacks. */
  shouldFallBack(): boolean;
  /** The delay before the next attempt (the backoff, grown by each call). */
  reconnectDelay(): number;
  /** The backoff starts over. */
  resetBackoff(): void;
}

/** The health of the SSE rung across its streams: when the next stream opens after one ended,
 * whether a stream that ended was stable. Times in ms on the caller's clock. */
export declare class SseHealth {
  constructor(options?: { stableAfter?: number; backoff?: Backoff });
  readonly stableAfter: number;
  readonly backoff: Backoff;
  prompted: boolean;
  /** Whether the stream ending at `now` was stable (nothing changes). */
  isStable(now: number, facts: { proven: boolean; openedAt: number | null; gaveUp: boolean }): boolean;
  /** The stream that ended was stable: the backoff and the prompt reconnect start over. */
  wasStable(): void;
  /** How the next stream opens: at once (a planned reopen), promptly (the one prompt reconnect
   * allowed until a stable stream, taken), else after `delay` ms (the backoff, grown; at least
   * `retryAfter`). */
  nextStream(ended: { reopen: boolean; live: boolean; closeCode: number | null; retryAfter?: number }):
    | { open: "reopen" | "prompt" }
    | { open: "backoff"; delay: number };
  /** The backoff starts over. */
  resetBackoff(): void;
}

export interface CloseAction {
  delay: "prompt" | "backoff";
  renewToken: boolean;
  clientBug: boolean;
}
export declare function closeAction(code: number): CloseAction;
/** The wait (ms) a refused HTTP request asked for: its `Retry-After` in seconds, at most `max`;
 * 0 without one. SSE and polling wait at least this long before asking again. */
export declare function retryAfterDelay(response: { headers?: { get(name: string): string | null } }, max: number): number;

export declare function shouldPoll(facts: {
  websocketSupported: boolean;
  failuresSinceLive: number;
  threshold?: number;
}): boolean;

export declare function computeState(facts: {
  closed: boolean;
  online: boolean;
  websocketLive: boolean;
  sseLive?: boolean;
  pollingOk: boolean;
  everConnected: boolean;
}): ConnectionState;

export declare function decodeTokenClaims(token: string): Record<string, unknown> | null;

/** Milliseconds until the token should be refreshed (a minute before expiry, or at 3/4 of a short
 * lifetime), at most 2^31 - 1 (24.8 days, the longest setTimeout waits); null when unknown
 * (no iat nor exp, or no iat and an exp already past when it was obtained). */
export declare function refreshDelay(facts: {
  iat?: number;
  exp?: number;
  expiresAt?: number | null;
  obtainedAt: number;
  now: number;
}): number | null;

export interface SseEvent {
  /** "message" when the stream names none. */
  event: string;
  data: string;
  /** The last event id in force (the cursor), or null. */
  id: string | null;
}

/** The event-stream parser: feed decoded text as it arrives, get the completed events. */
export declare class SseParser {
  lastId: string | null;
  /** Lines completed so far (a keepalive comment is one). */
  lines: number;
  /** Throws when the event being read grows past MAX_EVENT_LENGTH characters. */
  feed(text: string): SseEvent[];
  /** The longest event (data plus the line not ended yet) accepted, in characters (4 Mi). */
  static MAX_EVENT_LENGTH: number;
}

/** The SSE request path and Last-Event-ID for these projects and their cursors. */
export declare function sseRequest(
  cursors: Array<[number, Cursor | null]>,
  options?: { presence?: boolean },
): {
  path: string;
  lastEventId: string | null;
};

export interface SubscribeMessage {
  type: "subscribe";
  project_id: number;
  epoch?: string;
  after?: number;
  /** The tag of the event at `after`, when known. */
  tag?: string;
  presence?: boolean;
}

export declare class ProjectCursor {
  epoch: string | null;
  seq: number | null;
  resyncing: boolean;
  generation: number;
  buffer: ProjectEvent[];
  /** More than MAX_BUFFERED events arrived during one reload: the gap is repaired after it. */
  overflow: boolean;
  /** Events held back per project while the application reloads (10,000). */
  static MAX_BUFFERED: number;
  readonly known: boolean;
  /** The tag of the event at seq, or null when unknown. */
  readonly tag: string | null;
  /** Keep the gateway's tag of the event at (epoch, seq) when the cursor stands there without one. */
  learnTag(epoch: string, seq: number, tag: string | null): void;
  /** A resume from the cursor goes out: its answer is judged afresh, and events held during a reload are dropped (replayed again). */
  resume(): void;
  subscribeMessage(projectId: number): SubscribeMessage;
  /** `tags: false`: without the `tag` parameter. */
  pollQuery(options?: { tags?: boolean }): string;
  beginResync(epoch: string, seq: number, tag?: string | null): void;
  onSubscribed(message: { epoch: string; seq: number; resumed: boolean; tag?: string | null }): boolean;
  /** `origin`: the event's JSON text as received ({text}) or its tag ({tag}); else unknown. */
  accept(event: { seq: number }, origin?: { text: string } | { tag: string } | null): { deliver: ProjectEvent[]; gap: boolean };
  /** onResync's snapshot cursor: continue exactly after it (between beginResync and endResync). */
  adoptSnapshot(snapshot: Cursor): void;
  endResync(): { deliver: ProjectEvent[]; gap: boolean };
}
