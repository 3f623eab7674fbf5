"""The event bus gateway: relays each project's events from Redis to the browsers following it.

Layout (sans-I/O logic first, thin I/O around it):

* :mod:`gateway.sequencing`     -- ordering, gap detection and cursor logic (pure)
* :mod:`gateway.window`         -- each feed's recent frames, for resumes without Redis (pure)
* :mod:`gateway.session`        -- one connection: outbound queue, slow-consumer policy
* :mod:`gateway.frames`         -- WebSocket frames built once per event
* :mod:`gateway.hub`            -- per-project feeds, fan-out, gapless subscribe, gap repair
* :mod:`gateway.pubsub`         -- the pod's pub/sub link to Redis (reconnect, probe)
* :mod:`gateway.cluster_pubsub` -- one such link per master on Redis Cluster (slots, MOVED)
* :mod:`gateway.store`          -- history reads from the Redis streams
* :mod:`gateway.clients`        -- the client protocol, whatever the transport
* :mod:`gateway.presence`       -- presence state and diffs (pure)
* :mod:`gateway.presence_store` -- presence in Redis, shared by the pods
* :mod:`gateway.websocket`      -- the WebSocket transport (websockets' Sans-I/O protocol)
* :mod:`gateway.sse`            -- Server-Sent Events
* :mod:`gateway.http`           -- health, readiness, metrics, polling, the browser client
* :mod:`gateway.server`         -- wiring: the listening socket, periodic checks, drain
* :mod:`gateway.workers`        -- ``--workers N``: supervised processes sharing the port
* :mod:`gateway.config`         -- the one config Struct (flags and ``EVENTBUS_*`` variables)
"""

from gateway.config import GatewayConfig, load_config

__all__ = ["Gateway", "GatewayConfig", "load_config"]


def __getattr__(name: str):
    if name == "Gateway":
        from gateway.server import Gateway

        return Gateway
    raise AttributeError(name)
