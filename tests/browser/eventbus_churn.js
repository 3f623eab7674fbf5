// The page of test_eventbus_js_churn.py: gateway/static/eventbus.js against a real gateway, its
// own reconnect and resume logic, recording what reaches the application in order.
import { connect } from "/eventbus.js";

/**
 * Subscribe to `projectIds` through one real connection. `window.churn.log` gets, in the order
 * the application sees them, `{project, seq, id}` for every event handed to a subscribe callback
 * (`id`: the event's blocker_id, which the test set to its publish number) and
 * `{project, resync: {epoch, seq}}` for every onResync call (the cursor delivery continues after).
 */
export function start({ url, httpUrl, token, projectIds, backoff, websocket = true, pingInterval, pongTimeout, sseIdleTimeout, sse = true, pollInterval, pollTimeout, options = {} }) {
  const log = [];
  const errors = [];
  const states = [];
  const bus = connect({
    url,
    httpUrl,
    token: () => token,
    backoff,
    websocket,
    ...(pingInterval ? { pingInterval, pongTimeout } : {}),
    ...(sseIdleTimeout ? { sseIdleTimeout } : {}),
    sse,
    ...(pollInterval ? { pollInterval, pollTimeout } : {}),
    // `window.churn.gate`, when a test sets one (a promise), holds every reload until it resolves.
    onResync: (id) => {
      log.push({ project: id, resync: bus.cursor(id) });
      return window.churn.gate || undefined;
    },
    onError: (error) => errors.push(`${error.code}: ${error.message}`),
    onStateChange: (state, previous, { transport }) => states.push(`${state}/${transport}`),
    ...options, // any other option of connect() (connectTimeout, stableAfter, ...)
  });
  for (const projectId of projectIds) {
    bus.subscribe(projectId, (event) => log.push({ project: event.project_id, seq: event.seq, id: event.blocker_id }));
  }
  window.churn = {
    bus,
    log,
    errors,
    states,
    gate: null,
    /** Whether the application is at `seq` of `epoch` in every project of `ends`
     * ({projectId: [epoch, seq]}): its last event or resync there. */
    at(ends) {
      return Object.entries(ends).every(([projectId, [epoch, seq]]) => {
        const entries = log.filter((entry) => entry.project === Number(projectId));
        const last = entries[entries.length - 1];
        const cursor = bus.cursor(Number(projectId));
        return !!last && cursor !== null && cursor.epoch === epoch && (last.resync ? last.resync.seq : last.seq) === seq;
      });
    },
  };
}
