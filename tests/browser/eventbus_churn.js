// The page of test_eventbus_js_churn.py: gateway/static/eventbus.js against a real gateway, its
// own reconnect and resume logic, recording what reaches the application in order.
import { connect } from "/eventbus.js";

/**
 * Subscribe to `projectId` through a real connection. `window.churn.log` gets, in the order the
 * application sees them, `{seq, id}` for every event handed to the subscribe callback (`id`: the
 * event's blocker_id, which the test set to its publish number) and `{resync: {epoch, seq}}` for
 * every onResync call (the cursor delivery continues after).
 */
export function start({ url, httpUrl, token, projectId, backoff, websocket = true, pingInterval, pongTimeout, sseIdleTimeout }) {
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
    onResync: (id) => {
      log.push({ resync: bus.cursor(id) });
    },
    onError: (error) => errors.push(`${error.code}: ${error.message}`),
    onStateChange: (state, previous, { transport }) => states.push(`${state}/${transport}`),
  });
  bus.subscribe(projectId, (event) => log.push({ seq: event.seq, id: event.blocker_id }));
  window.churn = {
    bus,
    log,
    errors,
    states,
    /** The seq the application is at: of its last event or resync, or null before either. */
    at() {
      const last = log[log.length - 1];
      if (!last) return null;
      return last.resync ? last.resync.seq : last.seq;
    },
  };
}
