"""The Lua scripts that define how events are stored: one to publish, two to read.

Both run atomically inside Redis, so the stream (history) and the channel (live) can never
disagree: an event is appended and published in the same script, or not at all. The key layout is
described in :mod:`schemas.keys`.

History of a project is identified by its *epoch*, a random id created with the history. Whenever
the metadata is missing (first publish, Redis flushed or restarted empty), a new epoch is created
and the stale stream, if any, is dropped: a cursor from an older epoch can then never be mistaken
for a position in the new history.
"""

from __future__ import annotations

__all__ = ["HISTORY", "PUBLISH", "REVOKE", "SNAPSHOT"]

#: Publish a batch of events of one project.
#:
#: KEYS: meta, stream
#: ARGV: candidate epoch, max stream length, max age (ms, 0 = none), idempotency window (ms),
#:       publish command ("PUBLISH" or "SPUBLISH"), channel, idempotency key name ('' for none),
#:       digest of the event for that key ('' for none), then one JSON object per event.
#: The channel and the idempotency key are arguments, not keys, although they share the slot:
#: Redis Cluster counts a declared key that does not exist as "missing", and a multi-key call
#: with a missing key in a slot being migrated is refused with TRYAGAIN. Neither exists before
#: the call, so declaring them made every publish to a migrating slot fail until it ended.
#:
#: Returns {epoch, last seq, status}: for a batch of n events, their sequence numbers are
#: last-n+1 .. last; status 0 = published. With an idempotency key whose record belongs to the
#: current epoch, nothing is written and the recorded cursor is returned with status 1 (same
#: event: a duplicate), 3 (a duplicate, and the stream holds at last-n+1 .. last exactly the
#: frames this call would have stored: a retry of a call whose reply was lost, or the same
#: bytes published before, so their tags are those of this call's payloads) or 2 (the record's
#: digest differs: another event under the same key).
#: A record of another epoch is stale (the history it points into is gone): the batch is
#: published again and the record replaced. Records are "<epoch>|<seq>|<digest>", or
#: "<epoch>|<seq>" (retry guards, and records written before digests existed: never a conflict).
#:
#: Everything read is checked before the first write, so a key another writer damaged refuses
#: the call with an error reply "EVENTBUS_CORRUPT <key> <what>" and nothing is written: a meta
#: key that is not a hash or whose epoch or seq is not what this script writes, an idempotency
#: key that is not a record, a stream key of another type or whose entries run ahead of seq
#: (refused by the first XADD, which runs before any other write). Redis refuses a script for
#: OOM only at its first write, so an OOM refusal also writes nothing. An idempotency window
#: under 1 ms (which the record's ``SET ... PX`` after the events would refuse) is refused
#: before the first write too.
PUBLISH = """
local function corrupt(key, what)
  return redis.error_reply('EVENTBUS_CORRUPT ' .. key .. ' ' .. what)
end
local function wrong_type(reply)
  if type(reply) ~= 'table' or not reply['err'] then return false end
  return string.find(tostring(reply['err']), '^WRONGTYPE') ~= nil
end
-- Whether the stream holds, at the numbers last-n+1 .. last, exactly the frames this call's
-- payloads make there (a duplicate's bytes: status 3). Read only, errors taken as no.
local function stored_as_sent(last)
  local n = #ARGV - 8
  if n < 1 or last < n then return false end
  local first = string.format('%d', last - n + 1) .. '-0'
  local entries = redis.pcall('XRANGE', KEYS[2], first, string.format('%d', last) .. '-0')
  if type(entries) ~= 'table' or entries['err'] or #entries ~= n then return false end
  for i = 1, n do
    local id = string.format('%d', last - n + i)
    local fields = entries[i][2]
    local payload = ARGV[8 + i]
    if entries[i][1] ~= id .. '-0' or fields[1] ~= 'f'
        or fields[2] ~= string.sub(payload, 1, -2) .. ',"seq":' .. id .. '}' then
      return false
    end
  end
  return true
end
local meta = redis.pcall('HMGET', KEYS[1], 'epoch', 'seq')
if wrong_type(meta) then return corrupt(KEYS[1], 'is not a hash') end
if meta['err'] then return meta end
local epoch, seq = meta[1], meta[2]
if epoch then
  if #epoch > 64 or not string.find(epoch, '^[%w_-]+$') then
    return corrupt(KEYS[1], 'has an invalid epoch')
  end
  if not seq or #seq > 15 or not (seq == '0' or string.find(seq, '^[1-9]%d*$')) then
    return corrupt(KEYS[1], 'has an invalid seq')
  end
  seq = tonumber(seq)
end
local idempotency_key = ARGV[7]
if idempotency_key ~= '' then
  -- Its record is written with PX after the events, and Redis refuses PX below 1: refused now,
  -- before anything is written, rather than half-way.
  local window = tonumber(ARGV[4])
  if not window or window < 1 then
    return redis.error_reply('ERR idempotency window must be at least 1 ms')
  end
  local prior = redis.pcall('GET', idempotency_key)
  if wrong_type(prior) then return corrupt(idempotency_key, 'is not a string') end
  -- Any other error (e.g. 'non local key' from a node importing the slot) goes back as it is.
  if type(prior) == 'table' then return prior end
  if prior then
    -- The rule of schemas.stored.parse_idempotency_record.
    local e, s, d = string.match(prior, '^([%w_-]+)|([1-9]%d*)|(%x+)$')
    if not e then
      e, s = string.match(prior, '^([%w_-]+)|([1-9]%d*)$')
      d = ''
    end
    if not e or #s > 15 then return corrupt(idempotency_key, 'is not an idempotency record') end
    if e == epoch then
      local status = 1
      if d ~= '' and ARGV[8] ~= '' and d ~= ARGV[8] then
        status = 2
      elseif stored_as_sent(tonumber(s)) then
        status = 3
      end
      return {e, tonumber(s), status}
    end
  end
end
if not epoch then
  -- A new history (first publish, or Redis lost the metadata): a stale stream goes with it.
  epoch = ARGV[1]
  seq = 0
  redis.call('DEL', KEYS[2])
end
local n = #ARGV - 8
local last = seq + n
local time = redis.call('TIME')
local now_ms = string.format('%d', tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000))
local maxlen = ARGV[2]
local publish = ARGV[5]
local channel = ARGV[6]
for i = 1, n do
  local id = string.format('%d', seq + i)
  local payload = ARGV[8 + i]
  local frame = string.sub(payload, 1, -2) .. ',"seq":' .. id .. '}'
  if i == 1 then
    local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', maxlen, id .. '-0', 'f', frame,
                              't', now_ms)
    if wrong_type(added) then return corrupt(KEYS[2], 'is not a stream') end
    if type(added) == 'table' and added['err'] then
      if string.find(tostring(added['err']), 'equal or smaller', 1, true) then
        return corrupt(KEYS[2], 'has entries beyond the seq of ' .. KEYS[1])
      end
      return added  -- OOM (refused at the first write), or anything else Redis says
    end
    redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', last)
    -- A history a read created (SNAPSHOT) expires unless published to: now it is permanent.
    if seq == 0 then redis.call('PERSIST', KEYS[1]) end
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, id .. '-0', 'f', frame, 't', now_ms)
  end
  redis.call(publish, channel, epoch .. '|' .. id .. '|' .. now_ms .. '|' .. frame)
end
local max_age = tonumber(ARGV[3])
if max_age > 0 then
  -- Age retention: drop entries older than max_age. Checked once per 16 events of a project
  -- (when a batch crosses a multiple of 16, and on a project's first event), which takes a
  -- third off the script's cost; entries may outlive max_age by at most 15 events, and an idle
  -- project's stream still expires on time (PEXPIRE below, on every publish). Entry ids are dense
  -- sequence numbers, so the first entry young enough is found by bisection.
  --
  -- The events are written by now, and Redis does not undo a script that fails half-way: nothing
  -- below may raise. An entry another writer left (no 't' this script wrote) counts as young, so
  -- it never makes real events go early; count retention (MAXLEN) still bounds the stream.
  local function is_old(entry, cutoff)
    local fields = entry[2]
    for j = 1, #fields - 1, 2 do
      if fields[j] == 't' then
        local t = fields[j + 1]
        return #t <= 15 and string.find(t, '^%d+$') ~= nil and tonumber(t) < cutoff
      end
    end
    return false
  end
  local cutoff = tonumber(now_ms) - max_age
  local oldest = nil
  if last % 16 < n or last == n then
    oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  end
  if oldest and is_old(oldest, cutoff) then
    local lo = tonumber(string.match(oldest[1], '^(%d+)'))
    local hi = last
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local from = string.format('%d', mid) .. '-0'
      local entry = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', 1)[1]
      if is_old(entry, cutoff) then lo = mid + 1 else hi = mid end
    end
    redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', lo) .. '-0')
  end
  -- An idle project's whole history expires with its last event; the metadata (epoch, seq) stays
  -- so that clients that saw everything resume without a needless resync.
  redis.call('PEXPIRE', KEYS[2], max_age)
end
if idempotency_key ~= '' then
  local record = epoch .. '|' .. string.format('%d', last)
  if ARGV[8] ~= '' then record = record .. '|' .. ARGV[8] end
  redis.call('SET', idempotency_key, record, 'PX', ARGV[4])
end
return {epoch, last, 0}
"""

#: Lua function shared by the read scripts: the weight of a stream entry (the bytes of its field
#: names and values); an entry heavier than ``largest`` (> 0), which only another writer can have
#: left (the publish script never writes one), has its fields replaced by
#: ``{'oversize', '<its weight>'}``, and the stand-in's weight is returned.
_WEIGH_ENTRY = """
local function weigh_entry(entry, largest)
  local size = 0
  for _, value in ipairs(entry[2]) do size = size + #value end
  if largest > 0 and size > largest then
    -- Never a frame the bus wrote: what it weighed goes back, not what it holds.
    entry[2] = {'oversize', string.format('%d', size)}
    size = 8 + #entry[2][2]
  end
  return size
end
"""

#: Read a project's cursor and, optionally, the history after a client's cursor, atomically.
#:
#: KEYS: meta, stream
#: ARGV: candidate epoch, client's epoch ('' for none), client's last seen seq (-1 for none),
#:       maximum number of entries to return, lifetime (ms) of a history this read creates,
#:       maximum bytes of entries to return (0 or absent: no byte limit), largest entry
#:       (bytes; 0 or absent: no limit).
#: Returns {epoch, top seq, created flag, entries, problem, top tag, cursor tag}. ``entries``
#: (oldest first, at most the maximum) is only read when the client's epoch is the current one
#: and it is behind. The tags (schemas.tags, '' when unknown) are those of the events at the top
#: and, when the client's epoch is current, at its cursor (so that a cursor naming an event the
#: history no longer holds under that number, after a failover, is told apart).
#:
#: With a byte limit, ``entries`` ends before the entry that would take them past it (an entry
#: weighs the bytes of its field names and values), but always holds the first entry, so that
#: a reader paging on from the last entry always progresses. The stream is then read in chunks
#: of 64 entries, so that the script itself never holds much more than the limit either.
#:
#: An entry that weighs more than the largest entry (which only another writer can have left:
#: the publish script never writes one) comes back as ``{id, {'oversize', '<its weight>'}}``, so
#: that neither a replay nor a page ever carries it whole, and the reader still learns where it
#: is (a corrupt entry).
#:
#: A read never leaves permanent state behind: when the project has no history yet, the history
#: it creates (so that the reader gets a real cursor, which the first publish continues) expires
#: after the given lifetime unless an event is published meanwhile (the publish script then
#: makes it permanent). Every read renews that lifetime while nothing was published, and makes a
#: history permanent once it holds events.
#:
#: Values that the publish script cannot have written are never used: a meta or stream key of
#: another type, an epoch that is not 1-64 characters of [A-Za-z0-9_-], or a seq that is not an
#: integer give {'', 0, 0, {}, problem} (no tags) with problem one of 'meta_wrong_type',
#: 'meta_bad_epoch', 'meta_bad_seq', 'stream_wrong_type' (problem is '' otherwise). Stream
#: entries are returned as stored; the gateway checks each one (schemas.stored).
SNAPSHOT = (
    _WEIGH_ENTRY
    + """
local meta_type = redis.call('TYPE', KEYS[1])['ok']
if meta_type ~= 'hash' and meta_type ~= 'none' then
  return {'', 0, 0, {}, 'meta_wrong_type'}
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local created = 0
local top = 0
if not epoch then
  epoch = ARGV[1]
  created = 1
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
else
  if #epoch > 64 or not string.match(epoch, '^[A-Za-z0-9_-]+$') then
    return {'', 0, 0, {}, 'meta_bad_epoch'}
  end
  local raw_seq = redis.call('HGET', KEYS[1], 'seq')
  local canonical = raw_seq == '0' or (raw_seq and string.match(raw_seq, '^[1-9]%d*$'))
  if not canonical or #raw_seq > 15 then
    return {'', 0, 0, {}, 'meta_bad_seq'}
  end
  top = tonumber(raw_seq)
  if redis.call('PTTL', KEYS[1]) >= 0 then
    if top > 0 then
      redis.call('PERSIST', KEYS[1])
    else
      redis.call('PEXPIRE', KEYS[1], ARGV[5])
    end
  end
end
local after = tonumber(ARGV[3])
local entries = {}
if ARGV[2] == epoch and after >= 0 and after < top then
  local stream_type = redis.call('TYPE', KEYS[2])['ok']
  if stream_type ~= 'stream' and stream_type ~= 'none' then
    return {'', 0, 0, {}, 'stream_wrong_type'}
  end
  local from = string.format('%d', after + 1) .. '-0'
  local count = tonumber(ARGV[4])
  local budget = tonumber(ARGV[6] or '0')
  local largest = tonumber(ARGV[7] or '0')
  local function weigh(entry) return weigh_entry(entry, largest) end
  if budget <= 0 then
    entries = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', count)
    if largest > 0 then
      for _, entry in ipairs(entries) do weigh(entry) end
    end
  else
    local used, full = 0, false
    while not full and #entries < count do
      local want = math.min(count - #entries, 64)
      local chunk = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', want)
      for _, entry in ipairs(chunk) do
        local size = weigh(entry)
        if #entries > 0 and used + size > budget then
          full = true
          break
        end
        used = used + size
        entries[#entries + 1] = entry
      end
      if #chunk < want then break end  -- the end of the stream
      from = '(' .. chunk[#chunk][1]  -- after the last entry read, whatever its id
    end
  end
end
-- The tags (schemas.tags) of the events at the top and at the client's cursor: what tells a
-- cursor naming an event the history no longer holds under that number (a failover lost it).
local largest_tag = tonumber(ARGV[7] or '0')
local holds_stream = top > 0 and redis.call('TYPE', KEYS[2])['ok'] == 'stream'
local function tag_at(seq)
  if seq < 1 or not holds_stream then return '' end
  local id = string.format('%d', seq) .. '-0'
  local entry = redis.call('XRANGE', KEYS[2], id, id)[1]
  if not entry then return '' end
  local fields = entry[2]
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'f' then
      if largest_tag > 0 and #fields[i + 1] > largest_tag then return '' end
      return string.sub(redis.sha1hex(fields[i + 1]), 1, 16)
    end
  end
  return ''
end
local top_tag = tag_at(top)
local after_tag = ''
if ARGV[2] == epoch and after >= 1 and after <= top then
  after_tag = after == top and top_tag or tag_at(after)
end
return {epoch, top, created, entries, '', top_tag, after_tag}
"""
)

#: Read a project's cursor and stored entries without changing anything (the CLI's ``history``).
#:
#: KEYS: meta, stream
#: ARGV: first entry id to return (``<after + 1>-0``), maximum number of entries, largest entry
#:       (bytes; 0: no limit).
#: Returns {{epoch, seq} as stored (nil when absent), the oldest entry ({} when none), entries}:
#: read in one atomic step, so the cursor and the entries belong to the same instant. Unlike
#: SNAPSHOT it never creates a history. A meta or stream key of another type fails the call with
#: Redis's WRONGTYPE error; an entry heavier than the largest entry comes back as
#: ``{id, {'oversize', '<its weight>'}}`` (as in SNAPSHOT), so that a huge value another writer
#: left in the stream is never sent whole.
HISTORY = (
    _WEIGH_ENTRY
    + """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local largest = tonumber(ARGV[3])
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local entries = redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])
for _, entry in ipairs(oldest) do weigh_entry(entry, largest) end
for _, entry in ipairs(entries) do weigh_entry(entry, largest) end
return {meta, oldest, entries}
"""
)

#: Revoke the tokens of one subject issued before a time (see schemas.revocations).
#:
#: KEYS: the revocations hash, its version key (both in the slot ``{revocations}``)
#: ARGV: subject (1-1024 bytes of UTF-8), issued_before (unix s; '' = now by Redis' clock,
#:       rounded up to the next whole second: a token's ``iat`` is in whole seconds, so the
#:       tokens issued earlier in the current second are refused too), keep_for (s, > 0),
#:       max_entries (optional, > 0; absent or '' = DEFAULT_MAX_REVOCATIONS, 100,000).
#: Returns {issued_before, expires_at, version}: the subject's entry after the merge, and the
#: hash's new version.
#:
#: The cap (schemas.revocations.DEFAULT_MAX_REVOCATIONS): every live entry is in each gateway's
#: memory, so a leaked revoke key or a runaway script must not grow the hash without bound. A
#: subject that has a field in the hash (live, expired or malformed) is always written: it
#: replaces its own field and the hash does not grow. A new subject is written when the hash,
#: less the entries this call sweeps, holds fewer than max_entries; else the call is refused
#: with "EVENTBUS_REVOCATIONS_FULL <fields in the hash> <max_entries>": no entry is added or
#: changed and the version does not move (a refused call changes nothing a reader sees), but the
#: expired and malformed entries it read are removed all the same (readers leave them out), so
#: that calls on a list over the cap make room a slice at a time instead of each finding the
#: same pile. The check costs one HLEN (which the script makes anyway) and one HEXISTS, both
#: O(1), so a full hash costs a call no more than a large one did.
#:
#: The entry written is {issued_before, issued_before + keep_for}, merged with the subject's
#: live entry by taking the larger of each field: a revocation never lowers or shortens another.
#: While at it the script drops the entries it reads that have expired (now >= expires_at) and
#: the malformed ones (a field or value that schemas.revocations.decode_entry refuses, by the
#: same rule: the list must stay parseable). An entry that would be expired at once
#: (issued_before + keep_for in the past) is not stored.
#:
#: What it reads is bounded, so that a revocation never holds Redis for long however many there
#: are (a bulk revocation of thousands of people): a hash of up to REVOKE_SWEEP (500) entries is
#: read whole, and then expires with its last entry; a larger one is read REVOKE_SWEEP entries at
#: a time (HSCAN from a position that differs from call to call, so that every entry is read
#: sooner or later), and its expiry is only ever moved later.
#:
#: The version becomes max(version + 1, Redis' time in microseconds): it changes with every
#: revocation, and also differs from every version a reader saw before a flush or a failover
#: that lost writes (a plain counter starting again could reach a value a reader already saw,
#: with other entries: that reader would never reload them).
#:
#: Everything is checked before the first write: an argument out of range is refused with
#: "ERR <what>", a key of another type (or a version that is not an integer) with
#: "EVENTBUS_CORRUPT <key> <what>", and nothing is written. The version is the first write, so
#: Redis refusing the script for OOM also writes nothing.
REVOKE = """
local MAX = 9007199254740991
local MAX_SUBJECT = 1024
local SWEEP = 500
local DEFAULT_MAX_ENTRIES = 100000
local function corrupt(key, what)
  return redis.error_reply('EVENTBUS_CORRUPT ' .. key .. ' ' .. what)
end
local function whole(text)
  -- A canonical decimal of 0..MAX, or nil (the rule of schemas.revocations.decode_entry).
  if type(text) ~= 'string' or #text > 16 then return nil end
  if text ~= '0' and not string.find(text, '^[1-9]%d*$') then return nil end
  local n = tonumber(text)
  if n > MAX then return nil end
  return n
end
local function utf8_valid(s)
  -- Python's strict UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF. Each valid
  -- sequence is replaced by an ASCII byte (not removed: the bytes around it must not join into
  -- a sequence); anything left above 127 is invalid. Patterns run in C: a loop over the bytes
  -- in Lua held Redis ~50 ms for a full hash of long non-ASCII subjects.
  if not string.find(s, '[\\128-\\255]') then return true end
  s = string.gsub(s, '[\\194-\\223][\\128-\\191]', '.')
  s = string.gsub(s, '\\224[\\160-\\191][\\128-\\191]', '.')
  s = string.gsub(s, '[\\225-\\236\\238\\239][\\128-\\191][\\128-\\191]', '.')
  s = string.gsub(s, '\\237[\\128-\\159][\\128-\\191]', '.')
  s = string.gsub(s, '\\240[\\144-\\191][\\128-\\191][\\128-\\191]', '.')
  s = string.gsub(s, '[\\241-\\243][\\128-\\191][\\128-\\191][\\128-\\191]', '.')
  s = string.gsub(s, '\\244[\\128-\\143][\\128-\\191][\\128-\\191]', '.')
  return not string.find(s, '[\\128-\\255]')
end
local function subject_valid(s)
  return #s >= 1 and #s <= MAX_SUBJECT and utf8_valid(s)
end
local function parse_entry(value)
  -- {issued_before, expires_at} of a stored value, or nil when it is malformed.
  local a, b = string.match(value, '^{"issued_before":(%d+),"expires_at":(%d+)}$')
  local issued_before, expires_at = whole(a), whole(b)
  if not issued_before or not expires_at or issued_before >= expires_at then return nil end
  return issued_before, expires_at
end
local function fmt(n) return string.format('%d', n) end

local subject = ARGV[1]
if not subject_valid(subject) then
  return redis.error_reply('ERR the subject must be 1 to 1024 bytes of UTF-8')
end
local keep_for = whole(ARGV[3])
if not keep_for or keep_for < 1 then
  return redis.error_reply('ERR keep_for must be a positive whole number of seconds')
end
local max_entries = DEFAULT_MAX_ENTRIES
if ARGV[4] and ARGV[4] ~= '' then
  max_entries = whole(ARGV[4])
  if not max_entries or max_entries < 1 then
    return redis.error_reply('ERR max_entries must be a positive whole number')
  end
end
local time = redis.call('TIME')
local now = tonumber(time[1])
local issued_before
if ARGV[2] == '' then
  issued_before = now
  if tonumber(time[2]) > 0 then issued_before = now + 1 end
else
  issued_before = whole(ARGV[2])
  if not issued_before then
    return redis.error_reply('ERR issued_before must be a whole number of seconds')
  end
end
local expires_at = issued_before + keep_for
if expires_at > MAX then
  return redis.error_reply('ERR issued_before + keep_for is too far in the future')
end

local hash_type = redis.call('TYPE', KEYS[1])['ok']
if hash_type ~= 'hash' and hash_type ~= 'none' then return corrupt(KEYS[1], 'is not a hash') end
local version_type = redis.call('TYPE', KEYS[2])['ok']
if version_type ~= 'string' and version_type ~= 'none' then
  return corrupt(KEYS[2], 'is not a string')
end
local version = 0
if version_type == 'string' then
  version = whole(redis.call('GET', KEYS[2]))
  if not version or version >= MAX then return corrupt(KEYS[2], 'is not a version') end
end

-- Read and judge the entries before the first write.
local drop, dropped = {}, {}
local last = 0  -- the latest expires_at among the entries kept
local size = redis.call('HLEN', KEYS[1])
local whole_hash = size <= SWEEP
local entries
if whole_hash then
  entries = redis.call('HGETALL', KEYS[1])
else
  -- A slice, from a position that differs from call to call (the clock's microseconds pick the
  -- first bucket), and the subject's own entry (twice, if the slice has it too: no matter).
  -- The microseconds are the cursor's low bits: a scan goes through the buckets in the order of
  -- the cursor's reversed bits, so its low bits say how far along it starts. (Microseconds
  -- times 1000 left the three lowest bits to version % 8, which a refused call does not move:
  -- every call started in the same last eighth of the hash, and read the same few entries.)
  local cursor = string.format('%d', tonumber(time[2]) + 1000000 * (version % 1000))
  entries = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', SWEEP)[2]
  local own = redis.call('HGET', KEYS[1], subject)
  if own then
    entries[#entries + 1] = subject
    entries[#entries + 1] = own
  end
end
for i = 1, #entries, 2 do
  local field, value = entries[i], entries[i + 1]
  local b, e = nil, nil
  if subject_valid(field) then b, e = parse_entry(value) end
  if not b or now >= e then
    -- (Each field counted once: the cap below subtracts #drop from the hash's size.)
    if field ~= subject and not dropped[field] then
      dropped[field] = true
      drop[#drop + 1] = field
    end
  elseif field == subject then
    if b > issued_before then issued_before = b end
    if e > expires_at then expires_at = e end
  elseif e > last then
    last = e
  end
end

-- The cap, before the first write. A subject with a field of its own replaces it: the hash
-- does not grow, so it is never refused (an update must work on a full list). An entry that
-- is not stored (expired at once) does not grow it either.
-- A refused call still removes what it swept (entries no reader uses: expired or malformed),
-- and nothing else: a list over the cap (the cap lowered, or raised by another publisher) is
-- read a slice at a time, and calls that each found the same pile, swept nothing and were
-- refused would refuse every new subject until the live entries expire.
if now < expires_at and size - #drop >= max_entries
    and redis.call('HEXISTS', KEYS[1], subject) == 0 then
  for _, field in ipairs(drop) do redis.call('HDEL', KEYS[1], field) end
  return redis.error_reply(
    'EVENTBUS_REVOCATIONS_FULL ' .. fmt(size - #drop) .. ' ' .. fmt(max_entries))
end

local micros = now * 1000000 + tonumber(time[2])
version = math.max(version + 1, micros)
redis.call('SET', KEYS[2], fmt(version))
for _, field in ipairs(drop) do redis.call('HDEL', KEYS[1], field) end
if now < expires_at then
  local value = '{"issued_before":' .. fmt(issued_before) .. ',"expires_at":' .. fmt(expires_at)
  redis.call('HSET', KEYS[1], subject, value .. '}')
  if expires_at > last then last = expires_at end
else
  redis.call('HDEL', KEYS[1], subject)
end
if whole_hash then
  -- Every entry was read: the hash goes with its last one (an empty hash is gone already).
  if last > 0 then redis.call('EXPIREAT', KEYS[1], fmt(last)) end
elseif now < expires_at then
  -- Entries not read may live longer than any read: the expiry only moves later.
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl >= 0 and now + math.ceil(ttl / 1000) < expires_at then
    redis.call('EXPIREAT', KEYS[1], fmt(expires_at))
  end
end
return {issued_before, expires_at, version}
"""
