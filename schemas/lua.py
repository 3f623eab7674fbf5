"""The two Lua scripts that define how events are stored: one to publish, one to read.

Both run atomically inside Redis, so the stream (history) and the channel (live) can never
disagree: an event is appended and published in the same script, or not at all. The key layout is
described in :mod:`schemas.keys`.

History of a project is identified by its *epoch*, a random id created with the history. Whenever
the metadata is missing (first publish, Redis flushed or restarted empty), a new epoch is created
and the stale stream, if any, is dropped: a cursor from an older epoch can then never be mistaken
for a position in the new history.
"""

from __future__ import annotations

__all__ = ["PUBLISH", "SNAPSHOT"]

# Shared prelude: ensure the project's history exists. KEYS[1] = meta, KEYS[2] = stream,
# ARGV[1] = candidate epoch (random, made by the caller: scripts must stay deterministic).
_ENSURE_EPOCH = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local created = 0
if not epoch then
  epoch = ARGV[1]
  created = 1
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
"""

#: Publish a batch of events of one project.
#:
#: KEYS: meta, stream
#: ARGV: candidate epoch, max stream length, max age (ms, 0 = none), idempotency window (ms),
#:       publish command ("PUBLISH" or "SPUBLISH"), channel, idempotency key name ('' for none),
#:       then one JSON object per event.
#: The channel and the idempotency key are arguments, not keys, although they share the slot:
#: Redis Cluster counts a declared key that does not exist as "missing", and a multi-key call
#: with a missing key in a slot being migrated is refused with TRYAGAIN. Neither exists before
#: the call, so declaring them made every publish to a migrating slot fail until it ended.
#: Returns {epoch, last seq, duplicate flag}: for a batch of n events, their sequence numbers are
#: last-n+1 .. last. With an idempotency key already used, nothing is written and the first
#: publish's cursor is returned with the duplicate flag set.
PUBLISH = (
    """
local idempotency_key = ARGV[7]
if idempotency_key ~= '' then
  local prior = redis.call('GET', idempotency_key)
  if prior then
    local sep = string.find(prior, '|', 1, true)
    return {string.sub(prior, 1, sep - 1), tonumber(string.sub(prior, sep + 1)), 1}
  end
end
"""
    + _ENSURE_EPOCH
    + """
local n = #ARGV - 7
local last = redis.call('HINCRBY', KEYS[1], 'seq', n)
local time = redis.call('TIME')
local now_ms = string.format('%d', tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000))
local maxlen = ARGV[2]
local publish = ARGV[5]
local channel = ARGV[6]
for i = 1, n do
  local seq = string.format('%d', last - n + i)
  local payload = ARGV[7 + i]
  local frame = string.sub(payload, 1, -2) .. ',"seq":' .. seq .. '}'
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, seq .. '-0', 'f', frame, 't', now_ms)
  redis.call(publish, channel, epoch .. '|' .. seq .. '|' .. now_ms .. '|' .. frame)
end
local max_age = tonumber(ARGV[3])
if max_age > 0 then
  -- Age retention: drop entries older than max_age. Checked once per 16 events of a project
  -- (when a batch crosses a multiple of 16, and on a project's first event), which takes a
  -- third off the script's cost; entries may outlive max_age by at most 15 events, and an idle
  -- project's stream still expires on time (PEXPIRE below, on every publish). Entry ids are dense
  -- sequence numbers, so the first entry young enough is found by bisection.
  local cutoff = tonumber(now_ms) - max_age
  local oldest = nil
  if last % 16 < n or last == n then
    oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  end
  if oldest and tonumber(oldest[2][4]) < cutoff then
    local lo = tonumber(string.match(oldest[1], '^(%d+)'))
    local hi = last
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local from = string.format('%d', mid) .. '-0'
      local entry = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', 1)[1]
      if tonumber(entry[2][4]) < cutoff then lo = mid + 1 else hi = mid end
    end
    redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', lo) .. '-0')
  end
  -- An idle project's whole history expires with its last event; the metadata (epoch, seq) stays
  -- so that clients that saw everything resume without a needless resync.
  redis.call('PEXPIRE', KEYS[2], max_age)
end
if idempotency_key ~= '' then
  redis.call('SET', idempotency_key, epoch .. '|' .. string.format('%d', last), 'PX', ARGV[4])
end
return {epoch, last, 0}
"""
)

#: Read a project's cursor and, optionally, the history after a client's cursor, atomically.
#:
#: KEYS: meta, stream
#: ARGV: candidate epoch, client's epoch ('' for none), client's last seen seq (-1 for none),
#:       maximum number of entries to return.
#: Returns {epoch, top seq, created flag, entries} where entries (oldest first, at most the
#: maximum) is only read when the client's epoch is the current one and it is behind.
SNAPSHOT = (
    _ENSURE_EPOCH
    + """
local top = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local after = tonumber(ARGV[3])
local entries = {}
if ARGV[2] == epoch and after >= 0 and after < top then
  entries = redis.call('XRANGE', KEYS[2], string.format('%d', after + 1) .. '-0', '+', 'COUNT',
                       tonumber(ARGV[4]))
end
return {epoch, top, created, entries}
"""
)
