// The socket.io 4 baseline of bench/gateway.py: what a socket.io user would write to relay the
// event bus's Redis channels to browsers, on one Node.js process.
//
// * One room per project ("project:<id>"); a client joins it with the event
//   `subscribe` {project_id} and is answered `subscribed` {project_id} (`unsubscribe` /
//   `unsubscribed` leave it), as the Python baselines answer their `subscribe`.
// * One node-redis connection PSUBSCRIBEs every project channel (the pattern the Python
//   baselines use); each message `epoch|seq|ms|frame` becomes `io.to(room).emit("event", event)`
//   of the frame's JSON, parsed once per event (socket.io encodes it once per broadcast).
// * The default in-memory adapter: every node of a multi-node deployment fed this way subscribes
//   to the channels itself, so each emit only has to reach the node's own sockets. The
//   @socket.io/redis-adapter (or redis-streams-adapter) would forward the emit to the other nodes
//   as well, which already have the event: it is for events emitted by one node (or by
//   @socket.io/redis-emitter) that the other nodes must see, not for this feed.
// * socket.io's and engine.io's defaults otherwise (pings every 25 s, no compression, the
//   initial HTTP request kept), as an application would run it; the listen backlog is the
//   gateway's 4096. No history, replay, gap repair or backpressure.
//
// Run: node bench/socketio/server.js --port P --redis-url URL [--host H] [--prefix eventbus]
//      [--ping-interval MS --ping-timeout MS] (the tests' short pings; defaults: socket.io's).
// It listens only once the PSUBSCRIBE is confirmed, so a client that is connected is fed.

import { createServer } from "node:http";
import { parseArgs } from "node:util";
import { createClient } from "redis";
import { Server } from "socket.io";

const { values: args } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "8767" },
    "redis-url": { type: "string", default: "redis://127.0.0.1:6379/0" },
    prefix: { type: "string", default: "eventbus" },
    backlog: { type: "string", default: "4096" },
    "ping-interval": { type: "string" },
    "ping-timeout": { type: "string" },
  },
});

const options = {};
if (args["ping-interval"]) options.pingInterval = Number(args["ping-interval"]);
if (args["ping-timeout"]) options.pingTimeout = Number(args["ping-timeout"]);

const http = createServer();
const io = new Server(http, options);

// A project id as the Python baselines take it (int(...)); anything else is the client's own
// mistake and gets no answer, as there is nothing to confirm.
function projectOf(message) {
  const id = Number(message?.project_id);
  return Number.isSafeInteger(id) ? id : null;
}

io.on("connection", (socket) => {
  socket.on("subscribe", (message) => {
    const id = projectOf(message);
    if (id === null) return;
    socket.join(`project:${id}`);
    socket.emit("subscribed", { project_id: id });
  });
  socket.on("unsubscribe", (message) => {
    const id = projectOf(message);
    if (id === null) return;
    socket.leave(`project:${id}`);
    socket.emit("unsubscribed", { project_id: id });
  });
});

// The channel names of schemas/keys.py: <prefix>:{<project id>}:live.
const escaped = args.prefix.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
const channelRe = new RegExp(`^${escaped}:\\{(\\d+)\\}:live$`);

const redis = createClient({ url: args["redis-url"] });
redis.on("error", (err) => console.error(`socketio baseline: redis: ${err.message}`));
await redis.connect();
await redis.pSubscribe(`${args.prefix}:{*}:live`, (message, channel) => {
  const match = channelRe.exec(channel);
  if (match === null) return;
  // epoch|seq|ms|frame: the frame (the event's JSON) is everything after the third "|".
  let at = -1;
  for (let i = 0; i < 3; i++) {
    at = message.indexOf("|", at + 1);
    if (at < 0) return;
  }
  io.to(`project:${match[1]}`).emit("event", JSON.parse(message.slice(at + 1)));
});

http.listen({ host: args.host, port: Number(args.port), backlog: Number(args.backlog) });

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    io.close();
    redis.destroy();
    process.exit(0);
  });
}
