#!lua name=sse_gateway
--
-- sse-gateway's Redis Functions (Redis 7+). The gateway loads this library at start-up
-- (FUNCTION LOAD REPLACE) with its history settings filled in below.
--
-- Every call may declare one key, the application's key base: <app> on a single Redis (where it may
-- also declare none), "{<app>}" on Redis Cluster (where it must: that key routes the call to the
-- node holding the application's slot). The calls below show the single-Redis form with 0 keys.
--
-- Durable publish, for backends that speak only Redis: append to history and publish, atomically.
--   FCALL sse_publish 0 <app> <user> <payload>     -- to one user
--   FCALL sse_publish 0 <app> "" <payload>         -- to every user of the app (broadcast)
--   FCALL sse_publish 1 {<app>} <app> <user> <payload>   -- the same on Redis Cluster
--   -> { "<event id>", <subscribers that received it> }
-- Event ids are "<ms>-<seq>-<epoch>": the epoch names one unbroken history of the application and
-- is drawn afresh when that history may have lost events (see sse_position).
-- <payload> is the envelope JSON object {"type":..,"data":..}, checked as every publish path
-- checks it (a JSON object, at most MAX_MESSAGE_BYTES, nested at most 127 deep, a string "type");
-- the event id and "durable":true are added to it.
--
-- Replay (used by the gateway):
--   FCALL_RO sse_backlog 0 <app> <last event id> [#<page size>] <user>...
--   -> { "ok", <newest id or "">, { <id>, <message>, ... }, <user's own>... }
--        the application's broadcasts after the id (once, for every user), then for each user
--        their own events after the id as { <id>, <message>, ... }, or "too_old"; with a page
--        size, at most that many entries of each (a full list may go on: read again from the end)
--   -> { "reset", <newest id or "">, <reason> }     nobody's gap can be filled:
--        too_old | unknown_id | history_lost (the id's epoch is not the current one)
--   FCALL_RO sse_since 0 <app> <user> <last event id>    (one user, merged; earlier gateways use it)
--   -> { "ok", <newest id or "">, <message>... }   every durable event after the id, in id order
--   -> { "reset", <newest id or "">, <reason> }
--
-- Where an application's history stands (used by the gateway), and the fence against lost writes:
--   FCALL sse_position 0 <app> [<newest id this gateway saw>]
--   -> { "<newest id>", "ok" | "new" | "rolled_back" }
--   Starts a history (a new epoch) when there is none: Redis lost its data, or nothing was ever
--   published. When the gateway saw an id of the current epoch that is newer than what Redis holds,
--   writes were rolled back (a failover, a restart from an older file): a new epoch starts, so that
--   every client holding an id of the old one is told (reset "history_lost").
--
-- End-to-end probe (used by the gateway's readiness): FCALL sse_probe 0 <channel> <payload>
--   PUBLISH from a function: it fails unless the library is loaded and this node takes writes.
--   On Redis Cluster the channel is the one declared key (one probe channel per shard).
--
-- Connection registry writes (used by the gateway), applied in order:
--   FCALL sse_registry 0 <ttl> <op> <fields...> [<op> <fields...>]...
--     put    <app> <user> <conn> <instance> <remote_addr> <created_at> <user_agent>
--     touch  <app> <user> <conn>      push the entry's expiry out (the heartbeat)
--     remove <app> <user> <conn>
--   -> { <conn>... }   the touched entries that no longer exist (the gateway writes them again)
-- Keys: {app}:client:{user}:{conn} (hash), {app}:connections and {app}:connections:{user}
-- (sorted sets scored by expiry time; their own expiry is only ever pushed out).
--
-- Listing (used by the gateway), a page at a time, each page one call: the live entries of an
-- application's index (or of one user's) with their fields, read inside Redis.
--   FCALL_RO sse_list 0 <app> <cursor> <count> [<user>]
--   -> { <next cursor: "0" at the end>, { <field>, <value>, ... }... }
-- The cursor is ZSCAN's: an entry live throughout is listed at least once (rarely twice).
--
-- Admission (used by the gateway before a stream's 200): the caps, checked and reserved at once.
--   FCALL sse_join 0 <ttl> { <app> <user> <conn> <max per app> <max per user>
--                            <instance> <remote_addr> <created_at> <user_agent> }...  (0: no cap)
--   -> one answer per admission, in order: { "ok" } | { "user", <live streams> } | { "app", <n> }
--   "ok" writes <conn>'s registry entry (as sse_registry's put), so that no burst of connects,
--   on any number of instances, gets past a cap, and a stream costs one write, not two.
--   FCALL sse_admit 0 <ttl> { <app> <user> <conn> <max per app> <max per user> }...
--   The same for earlier gateways: "ok" enters <conn> in both indexes only (they write the
--   entry in full later).
--
-- Keys: {app}:history:last (newest id), {app}:history:user:{user} and {app}:history:app (streams,
-- entry ids "<ms>-<seq>"), each stream with a <stream>:trimmed key: every id up to it may be
-- missing from the stream (trimmed, aged out, or lost when the stream expired and was re-created).
-- Ids come from one sequence per application, so one id places a client in both streams.
--
-- On Redis Cluster every name above starts with "{<app>}" instead of "<app>" (one slot per
-- application), and events go out with SPUBLISH on the shard channels "{<app>}:channel:<user>"
-- and "{<app>}:broadcast".
--
-- With CLUSTER_PARTITIONS = n > 1 (Redis Cluster only) an application is split into n histories,
-- and every <app> above is one of them, "<app>#<k>": user u belongs to k = djb2(u) mod n (see
-- partition below), each history has its own ids and a copy of every broadcast. A durable publish
-- to a user must name the user's partition, and a broadcast goes to each partition:
--   FCALL sse_publish 1 {<app>#<k>} <app>#<k> <user> <payload>
--   FCALL sse_publish 1 {<app>#<k>} <app>#<k> "" <payload>      for k = 0 .. n-1
-- Anything else is refused with the call to make (an event where nobody reads would be lost).

local MAXLEN = __MAXLEN__   -- entries kept per stream
local TTL = __TTL__         -- seconds an entry is kept
local MAX_BYTES = __MAX_BYTES__  -- largest message delivered (MAX_MESSAGE_BYTES)
local MAX_DEPTH = 127       -- deepest nesting of an envelope (as the gateway's JSON parser)
local CLUSTER = __CLUSTER__ -- Redis Cluster: hash-tagged names and sharded pub/sub
local PARTITIONS = __PARTITIONS__ -- histories per application (CLUSTER_PARTITIONS; 1: one slot)
local PUBLISH = CLUSTER and 'SPUBLISH' or 'PUBLISH'

-- What every key and channel name of an application starts with. On Redis Cluster it is a hash
-- tag, "{<app>}", so that all of an application's keys and channels are in one slot: one call
-- stays on one node, and the channels are that node's shard channels.
local function base(app)
  if CLUSTER then return '{' .. app .. '}' end
  return app
end

-- nil when the call's declared keys fit `app`, else an error reply. On Redis Cluster the one key
-- "{<app>}" routes the call to the application's node; elsewhere keys are optional.
local function undeclared(keys, app, name)
  if #keys == 0 and not CLUSTER then return nil end
  if #keys == 1 and keys[1] == base(app) then return nil end
  return redis.error_reply(name .. ': declare the application as the one key: FCALL ' .. name
    .. ' 1 ' .. base(tostring(app)) .. ' ...')
end

local function valid_id(s)
  return type(s) == 'string' and #s >= 1 and #s <= 128 and not string.find(s, '[^%w%._~@%+=%-]')
end

-- The partition of a user: djb2 (h = h * 33 + byte from 5381, modulo 2^32) modulo PARTITIONS,
-- as the gateway computes it. (Exact in Lua's doubles: h * 33 + 255 < 2^38.)
local function partition(user)
  local h = 5381
  for i = 1, #user do h = (h * 33 + string.byte(user, i)) % 4294967296 end
  return h % PARTITIONS
end

-- What the functions take as <app>: the application id, or with PARTITIONS > 1 one of its
-- histories, "<app>#<k>" (k < PARTITIONS). Returns the application id, or nil.
local function valid_app(s)
  if PARTITIONS == 1 then return valid_id(s) and s or nil end
  if type(s) ~= 'string' then return nil end
  local app, k = string.match(s, '^(.+)#(%d+)$')
  if not app or not valid_id(app) or #k > 4 or tonumber(k) >= PARTITIONS then return nil end
  if #k > 1 and string.sub(k, 1, 1) == '0' then return nil end
  return app
end

-- nil when `s` is an <app> this library takes, else an error reply for function `name`. A
-- partition name that does not fit PARTITIONS means instances disagree on CLUSTER_PARTITIONS
-- (the library is the last-started instance's): said plainly, since events would go astray.
local function invalid_app(s, name)
  if valid_app(s) then return nil end
  if type(s) == 'string' and string.find(s, '#', 1, true) then
    return redis.error_reply(name .. ': ' .. s .. ' names a partition, but the library loaded is for '
      .. 'CLUSTER_PARTITIONS=' .. PARTITIONS .. ': every instance must use the same CLUSTER_PARTITIONS')
  end
  return redis.error_reply(name .. ': invalid application id')
end

-- nil when a durable publish names the history its recipients read, else an error reply that
-- names the call to make (on a partitioned cluster a user's events go to their partition, and a
-- broadcast to every partition: an event written anywhere else would reach nobody).
local function misplaced(app, user)
  if PARTITIONS == 1 then return nil end
  local tenant = string.match(app, '^(.+)#%d+$') or app
  if user == '' then
    if tenant ~= app then return nil end
    return redis.error_reply('sse_publish: ' .. tenant .. ' is spread over ' .. PARTITIONS
      .. ' partitions: publish a broadcast to each, FCALL sse_publish 1 {' .. tenant .. '#<k>} '
      .. tenant .. '#<k> "" ... for k = 0..' .. (PARTITIONS - 1) .. ' (or use POST /publish)')
  end
  local history = tenant .. '#' .. partition(user)
  if history == app then return nil end
  return redis.error_reply('sse_publish: ' .. user .. ' is in partition ' .. history
    .. ': FCALL sse_publish 1 {' .. history .. '} ' .. history .. ' ' .. user .. ' ...')
end

-- "<ms>-<seq>" (a stream entry id, or a marker) as { ms, seq }.
local function parse_plain(id)
  if type(id) ~= 'string' or #id > 64 then return nil end
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  if not ms or #ms > 15 or #seq > 15 then return nil end
  return { tonumber(ms), tonumber(seq) }
end

-- An event id "<ms>-<seq>-<epoch>" as { ms, seq, epoch }.
local function parse(id)
  if type(id) ~= 'string' or #id > 64 then return nil end
  local ms, seq, epoch = string.match(id, '^(%d+)%-(%d+)%-([0-9a-z]+)$')
  if not ms or #ms > 15 or #seq > 15 or #epoch > 6 then return nil end
  if #epoch > 1 and string.sub(epoch, 1, 1) == '0' then return nil end
  return { tonumber(ms), tonumber(seq), epoch }
end

local function cmp(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] and -1 or 1 end
  if a[2] ~= b[2] then return a[2] < b[2] and -1 or 1 end
  return 0
end

local function fmt_plain(id)
  return string.format('%d-%d', id[1], id[2])
end

local function fmt(id)
  return string.format('%d-%d-%s', id[1], id[2], id[3])
end

local DIGITS = '0123456789abcdefghijklmnopqrstuvwxyz'
local EPOCH_LIMIT = 2176782336 -- 36^6
-- Largest counter written in a marker: "everything in that millisecond".
local MAX_SEQ = 999999999999999

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A new epoch: the clock in microseconds, modulo 36^6, in base 36 (as the gateway's Epoch).
local function new_epoch()
  local t = redis.call('TIME')
  local n = (tonumber(t[1]) * 1000000 + tonumber(t[2])) % EPOCH_LIMIT
  local s = ''
  repeat
    local d = n % 36
    s = string.sub(DIGITS, d + 1, d + 1) .. s
    n = math.floor(n / 36)
  until n == 0
  return s
end

-- The application's newest id, or nil when it has no history (or one an older gateway wrote).
local function current(app)
  return parse(redis.call('GET', base(app) .. ':history:last'))
end

-- Raises a stream's marker to `id` (every id up to it may be missing).
local function mark(stream, id)
  local marker = stream .. ':trimmed'
  local before = parse_plain(redis.call('GET', marker))
  if not before or cmp(id, before) > 0 then redis.call('SET', marker, fmt_plain(id)) end
end

-- Trims a stream to MAXLEN entries and to entries newer than `min_ms`, exactly, and remembers the
-- newest id ever trimmed in <stream>:trimmed. (XINFO's max-deleted-entry-id does not count trims,
-- and approximate trimming would not say what went; a gap must be known exactly.)
local function trim(stream, min_ms)
  local trimmed = nil
  local len = redis.call('XLEN', stream)
  if len > MAXLEN then
    local cut = redis.call('XRANGE', stream, '-', '+', 'COUNT', len - MAXLEN)
    trimmed = parse_plain(cut[#cut][1])
    redis.call('XTRIM', stream, 'MAXLEN', MAXLEN)
  end
  local min_id = fmt_plain({ min_ms, 0 })
  local old = redis.call('XREVRANGE', stream, '(' .. min_id, '-', 'COUNT', 1)
  if #old > 0 then
    local aged = parse_plain(old[1][1])
    if not trimmed or cmp(aged, trimmed) > 0 then trimmed = aged end
    redis.call('XTRIM', stream, 'MINID', min_id)
  end
  if trimmed then mark(stream, trimmed) end
  redis.call('EXPIRE', stream .. ':trimmed', TTL)
end

-- Whether a decoded JSON value nests no deeper than `left` levels.
local function shallow(v, left)
  if type(v) ~= 'table' then return true end
  if left == 0 then return false end
  for _, item in pairs(v) do
    if not shallow(item, left - 1) then return false end
  end
  return true
end

-- The checks every publish path shares (the gateway's `sse::check_envelope`): a JSON object no
-- larger than MAX_BYTES once stamped, no deeper than MAX_DEPTH, with a string "type" and a
-- whole-number "retry" if any. Returns an error message, or nil.
local function invalid_envelope(payload)
  if type(payload) ~= 'string' then return 'missing payload' end
  -- Room for the id and the durable mark the stamp adds.
  if #payload + 64 > MAX_BYTES then return 'message larger than ' .. MAX_BYTES .. ' bytes' end
  local ok, value = pcall(cjson.decode, payload)
  if not ok and string.find(tostring(value), 'nested', 1, true) then
    return 'payload nested deeper than ' .. MAX_DEPTH
  end
  if not ok or type(value) ~= 'table' or not string.match(payload, '^%s*{') then
    return 'payload must be a JSON object'
  end
  if not shallow(value, MAX_DEPTH) then return 'payload nested deeper than ' .. MAX_DEPTH end
  local t, retry = value['type'], value['retry']
  if t ~= nil and t ~= cjson.null and type(t) ~= 'string' then return '"type" must be a string' end
  if retry ~= nil and retry ~= cjson.null
    and (type(retry) ~= 'number' or retry < 0 or retry ~= math.floor(retry)) then
    return '"retry" must be a whole number of milliseconds'
  end
  return nil
end

local function sse_publish(keys, args)
  local app, user, payload = args[1], args[2], args[3]
  if PARTITIONS > 1 and valid_id(app) and (user == '' or valid_id(user)) then
    local wrong = misplaced(app, user)
    if wrong then return wrong end
  end
  local bad_app = invalid_app(app, 'sse_publish')
  if bad_app then return bad_app end
  local wrong = undeclared(keys, app, 'sse_publish')
  if wrong then return wrong end
  if user ~= '' and not valid_id(user) then return redis.error_reply('sse_publish: invalid user id') end
  wrong = misplaced(app, user)
  if wrong then return wrong end
  local invalid = invalid_envelope(payload)
  if invalid then return redis.error_reply('sse_publish: ' .. invalid) end
  local body = string.match(payload, '^%s*{(.*)}%s*$')

  local ms = now_ms()
  local last = current(app)
  local id
  if not last then
    id = { ms, 0, new_epoch() }
  elseif last[1] >= ms then
    id = { last[1], last[2] + 1, last[3] }
  else
    id = { ms, 0, last[3] }
  end
  local sid = fmt(id)
  redis.call('SET', base(app) .. ':history:last', sid)

  -- The id last, so that it wins over any "id" the publisher put in; "durable" marks an event of
  -- history, so that only this path's ids are taken for durable ones.
  local message
  if string.match(body, '^%s*$') then
    message = '{"id":"' .. sid .. '","durable":true}'
  else
    message = '{' .. body .. ',"id":"' .. sid .. '","durable":true}'
  end

  local stream, channel
  if user == '' then
    stream, channel = base(app) .. ':history:app', base(app) .. ':broadcast'
  else
    stream, channel = base(app) .. ':history:user:' .. user, base(app) .. ':channel:' .. user
  end
  if redis.call('EXISTS', stream) == 0 then
    -- A stream that expired took its marker with it: what it held is gone. It held nothing newer
    -- than TTL before its expiry, so every id up to now - TTL may be missing.
    mark(stream, { math.max(0, ms - TTL * 1000), MAX_SEQ })
  end
  redis.call('XADD', stream, fmt_plain(id), 'm', message)
  trim(stream, math.max(0, id[1] - TTL * 1000))
  redis.call('EXPIRE', stream, TTL)
  local receivers = redis.call(PUBLISH, channel, message)
  return { sid, receivers }
end

-- The newest id trimmed from a stream, or nil.
local function max_deleted(stream)
  return parse_plain(redis.call('GET', stream .. ':trimmed'))
end

-- The entries of `stream` after `after`, or nil when the stream cannot tell: trimmed past the id,
-- or gone (expired) while the id is older than what is kept. (Written since `after`, a stream
-- would still exist: so if it does not, nothing was written to it since.)
local function entries_after(stream, after, oldest_kept, limit)
  if redis.call('EXISTS', stream) == 0 then
    if after[1] < oldest_kept then return nil end
    return {}
  end
  local deleted = max_deleted(stream)
  if deleted and cmp(after, deleted) < 0 then return nil end
  if limit then
    return redis.call('XRANGE', stream, '(' .. fmt_plain(after), '+', 'COUNT', limit)
  end
  return redis.call('XRANGE', stream, '(' .. fmt_plain(after), '+')
end

-- Where a client resuming after `from` stands: nil and a reset reply when the id cannot be
-- resumed from (not ours, from the future, or history lost); else the newest id, the parsed
-- id, and whether it is already the newest.
local function resume_point(app, from)
  local last = current(app)
  local newest = last and fmt(last) or ''
  local after = parse(from)
  if not after then return nil, { 'reset', newest, 'unknown_id' } end
  if not last or after[3] ~= last[3] then return nil, { 'reset', newest, 'history_lost' } end
  if cmp(after, last) > 0 then return nil, { 'reset', newest, 'unknown_id' } end
  return newest, after, cmp(after, last) == 0
end

local function sse_since(keys, args)
  local app, user, from = args[1], args[2], args[3]
  local bad_app = invalid_app(app, 'sse_since')
  if bad_app then return bad_app end
  if not valid_app(app) or not valid_id(user) then
    return redis.error_reply('sse_since: invalid application or user id')
  end
  local wrong = undeclared(keys, app, 'sse_since')
  if wrong then return wrong end
  local newest, after, current = resume_point(app, from)
  if not newest then return after end
  if current then return { 'ok', newest } end

  local oldest_kept = now_ms() - TTL * 1000
  local lists = {}
  for _, stream in ipairs({ base(app) .. ':history:user:' .. user, base(app) .. ':history:app' }) do
    local entries = entries_after(stream, after, oldest_kept)
    if not entries then return { 'reset', newest, 'too_old' } end
    lists[#lists + 1] = entries
  end

  -- Merge the two id-ordered lists.
  local out = { 'ok', newest }
  local a, b = lists[1], lists[2]
  local i, j = 1, 1
  while i <= #a or j <= #b do
    local take_a
    if i > #a then take_a = false
    elseif j > #b then take_a = true
    else take_a = cmp(parse_plain(a[i][1]), parse_plain(b[j][1])) <= 0 end
    local entry
    if take_a then entry = a[i]; i = i + 1 else entry = b[j]; j = j + 1 end
    out[#out + 1] = entry[2][2]
  end
  return out
end

-- { id1, message1, id2, message2, ... } from stream entries, the ids in `epoch`.
local function flat(entries, epoch)
  local out = {}
  for _, e in ipairs(entries) do
    out[#out + 1] = e[1] .. '-' .. epoch
    out[#out + 1] = e[2][2]
  end
  return out
end

local function sse_backlog(keys, args)
  local app, from = args[1], args[2]
  local bad_app = invalid_app(app, 'sse_backlog')
  if bad_app then return bad_app end
  local wrong = undeclared(keys, app, 'sse_backlog')
  if wrong then return wrong end
  -- An optional "#<n>" (never a user id) reads a page: at most n entries of each stream.
  local first, limit = 3, nil
  if type(args[3]) == 'string' and string.sub(args[3], 1, 1) == '#' then
    limit = tonumber(string.sub(args[3], 2))
    if not limit or limit < 1 then return redis.error_reply('sse_backlog: invalid page size') end
    first = 4
  end
  for i = first, #args do
    if not valid_id(args[i]) then return redis.error_reply('sse_backlog: invalid user id') end
  end
  local newest, after, current = resume_point(app, from)
  if not newest then return after end
  local out = { 'ok', newest, {} }
  if current then
    for i = first, #args do out[#out + 1] = {} end
    return out
  end
  local oldest_kept = now_ms() - TTL * 1000
  local broadcasts = entries_after(base(app) .. ':history:app', after, oldest_kept, limit)
  if not broadcasts then return { 'reset', newest, 'too_old' } end
  out[3] = flat(broadcasts, after[3])
  for i = first, #args do
    local mine = entries_after(base(app) .. ':history:user:' .. args[i], after, oldest_kept, limit)
    out[#out + 1] = mine and flat(mine, after[3]) or 'too_old'
  end
  return out
end

local function sse_position(keys, args)
  local app, seen = args[1], parse(args[2])
  local bad_app = invalid_app(app, 'sse_position')
  if bad_app then return bad_app end
  local wrong = undeclared(keys, app, 'sse_position')
  if wrong then return wrong end
  local last = current(app)
  local status = 'ok'
  if not last then
    -- Keep ids moving forward even when the clock is behind what was seen.
    local ms = now_ms()
    if seen and seen[1] > ms then ms = seen[1] end
    last, status = { ms, 0, new_epoch() }, 'new'
  elseif seen and seen[3] == last[3] and cmp(seen, last) > 0 then
    last, status = { seen[1], seen[2], new_epoch() }, 'rolled_back'
  else
    return { fmt(last), status }
  end
  redis.call('SET', base(app) .. ':history:last', fmt(last))
  return { fmt(last), status }
end

local function sse_probe(keys, args)
  if type(args[1]) ~= 'string' or string.sub(args[1], 1, 10) ~= 'sse-probe:' then
    return redis.error_reply('sse_probe: not a probe channel')
  end
  if CLUSTER and (#keys ~= 1 or keys[1] ~= args[1]) then
    return redis.error_reply('sse_probe: on Redis Cluster the channel is the one key')
  end
  return redis.call(PUBLISH, args[1], args[2] or '')
end

-- Pushes an index's expiry out, never in: indexes are shared by every instance, so an instance
-- with a shorter TTL cannot expire the others' entries (NX for a fresh key, GT after).
local function extend(index, ttl)
  redis.call('EXPIRE', index, ttl, 'NX')
  redis.call('EXPIRE', index, ttl, 'GT')
end

local REGISTRY_FIELDS = { put = 7, touch = 3, remove = 3 }

-- A connection's registry hash, its fields args[at] .. args[at + 3]: instance, remote_addr,
-- created_at, user_agent.
local function write_entry(ttl, app, user, conn, args, at)
  local key = base(app) .. ':client:' .. user .. ':' .. conn
  redis.call('HSET', key, 'id', conn, 'app', app, 'user', user, 'instance', args[at],
    'remote_addr', args[at + 1], 'created_at', args[at + 2], 'user_agent', args[at + 3],
    'channel_id', base(app) .. ':channel:' .. user)
  redis.call('EXPIRE', key, ttl)
end

local function sse_registry(keys, args)
  local ttl = tonumber(args[1])
  if not ttl or ttl < 1 then return redis.error_reply('sse_registry: invalid ttl') end
  local t = redis.call('TIME')
  local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + ttl
  local missing, indexes = {}, {}
  local i = 2
  while i <= #args do
    local op = args[i]
    local n = REGISTRY_FIELDS[op]
    if not n or i + n > #args then return redis.error_reply('sse_registry: bad operation at ' .. i) end
    local app, user, conn = args[i + 1], args[i + 2], args[i + 3]
    local bad_app = invalid_app(app, 'sse_registry')
    if bad_app then return bad_app end
    if not valid_app(app) or not valid_id(user) or not valid_id(conn) then
      return redis.error_reply('sse_registry: invalid application, user or connection id')
    end
    local wrong = undeclared(keys, app, 'sse_registry')
    if wrong then return wrong end
    local key = base(app) .. ':client:' .. user .. ':' .. conn
    local app_index, user_index = base(app) .. ':connections', base(app) .. ':connections:' .. user
    local index = op ~= 'remove'
    if op == 'put' then
      write_entry(ttl, app, user, conn, args, i + 4)
    elseif op == 'touch' then
      if redis.call('EXPIRE', key, ttl) == 0 then
        missing[#missing + 1] = conn
        index = false
      end
    else
      redis.call('DEL', key)
      redis.call('ZREM', app_index, user .. ':' .. conn)
      redis.call('ZREM', user_index, conn)
    end
    if index then
      redis.call('ZADD', app_index, expires, user .. ':' .. conn)
      redis.call('ZADD', user_index, expires, conn)
      indexes[app_index] = true
      indexes[user_index] = true
    end
    i = i + n + 1
  end
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  for index in pairs(indexes) do
    -- Entries of instances that died stay until their score passes: pruned as the index is
    -- written, so that listings and admissions do not walk them.
    redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
    extend(index, ttl)
  end
  return missing
end

-- Most entries one listing page reads (a page is one call: it must stay short).
local MAX_PAGE = 1000

local function sse_list(keys, args)
  local app, cursor, count, user = args[1], args[2], tonumber(args[3]), args[4]
  local bad_app = invalid_app(app, 'sse_list')
  if bad_app then return bad_app end
  if not valid_app(app) or (user ~= nil and not valid_id(user)) then
    return redis.error_reply('sse_list: invalid application or user id')
  end
  if type(cursor) ~= 'string' or not string.match(cursor, '^%d+$') or not count or count < 1
    or count > MAX_PAGE then
    return redis.error_reply('sse_list: invalid cursor or page size')
  end
  local wrong = undeclared(keys, app, 'sse_list')
  if wrong then return wrong end
  local index = base(app) .. ':connections'
  local prefix = base(app) .. ':client:'
  if user then
    index = index .. ':' .. user
    prefix = prefix .. user .. ':'
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local page = redis.call('ZSCAN', index, cursor, 'COUNT', count)
  local out = { page[1] }
  local items = page[2]
  for i = 1, #items, 2 do
    -- An app index's members are "<user>:<conn>", a user index's "<conn>": either way the
    -- entry's key is the prefix and the member.
    if tonumber(items[i + 1]) > now then
      local entry = redis.call('HGETALL', prefix .. items[i])
      if #entry > 0 then out[#out + 1] = entry end
    end
  end
  return out
end

-- Fields of one admission: sse_admit's, and sse_join's (which adds the registry entry's).
local ADMIT_FIELDS, JOIN_FIELDS = 5, 9

-- Most members one ZADD of the app index takes (its arguments go through unpack).
local ZADD_SLICE = 1000

-- An index's entry count within one call (`seen`, see admit): counted once, then kept up to
-- date by the call's own additions, including the app index's members written at the call's
-- end. Entries of instances that died stay until their score passes: they are counted until the
-- count reaches the cap, and only then pruned and counted again, so that a refusal counts live
-- entries only and an admission far below the cap costs no pruning.
local function entries(seen, index, cap, now)
  local n = seen.counts[index]
  if n == nil then n = redis.call('ZCARD', index) end
  if cap > 0 and n >= cap and not seen.pruned[index] then
    seen.pruned[index] = true
    redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
    n = redis.call('ZCARD', index) + (seen.pending[index] or 0)
  end
  seen.counts[index] = n
  return n
end

-- One admission, its fields from args[i]: { "ok" } | { "user", n } | { "app", n } (see the
-- header). `entry`: write the registry entry too (sse_join). The user index is written at once;
-- the app index's member is kept in `seen.members` for one ZADD at the call's end.
local function admit_one(ttl, now, args, i, seen, entry)
  local app, user, conn = args[i], args[i + 1], args[i + 2]
  local max_app, max_user = tonumber(args[i + 3]), tonumber(args[i + 4])
  local app_index, user_index = base(app) .. ':connections', base(app) .. ':connections:' .. user
  -- Counted even without a cap: a user index with no entry no longer exists (pruning deletes an
  -- emptied key), and one created here needs a single EXPIRE, not two.
  local n = entries(seen, user_index, max_user, now)
  if max_user > 0 and n >= max_user then return { 'user', n } end
  local m = entries(seen, app_index, max_app, now)
  if max_app > 0 and m >= max_app then return { 'app', m } end
  local score = now + ttl
  -- 0 when <conn> was in the index already: counted once, in both indexes.
  local added = redis.call('ZADD', user_index, score, conn)
  seen.counts[user_index] = n + added
  seen.counts[app_index] = m + added
  seen.pending[app_index] = (seen.pending[app_index] or 0) + added
  local members = seen.members[app_index]
  if not members then
    members = {}
    seen.members[app_index] = members
  end
  members[#members + 1] = score
  members[#members + 1] = user .. ':' .. conn
  if seen.gained[user_index] == nil then seen.gained[user_index] = n == 0 end
  if entry then write_entry(ttl, app, user, conn, args, i + ADMIT_FIELDS) end
  return { 'ok' }
end

-- sse_admit (fields = ADMIT_FIELDS) and sse_join (JOIN_FIELDS, with the registry entry).
local function admit(keys, args, fields, name)
  local ttl = tonumber(args[1])
  if not ttl or ttl < 1 or (#args - 1) % fields ~= 0 then
    return redis.error_reply(name .. ': invalid ttl or admission list')
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  -- Every admission is checked before any is written: a refused call writes nothing. (A call
  -- names one application, checked once.)
  local apps = {}
  for i = 2, #args, fields do
    local app, user, conn = args[i], args[i + 1], args[i + 2]
    if not apps[app] then
      local bad_app = invalid_app(app, name)
      if bad_app then return bad_app end
      local wrong = undeclared(keys, app, name)
      if wrong then return wrong end
      apps[app] = true
    end
    if not valid_id(user) or not valid_id(conn) or not tonumber(args[i + 3])
      or not tonumber(args[i + 4]) then
      return redis.error_reply(name .. ': invalid application, user, connection id or cap')
    end
  end
  -- counts: entries per index; pruned: indexes pruned by this call; pending: app index members
  -- admitted but not yet written; members: those members, as ZADD's score-member pairs; gained:
  -- user indexes that gained an entry, true for one this call created.
  local seen = { counts = {}, pruned = {}, pending = {}, members = {}, gained = {} }
  local answers = {}
  for i = 2, #args, fields do
    answers[#answers + 1] = admit_one(ttl, now, args, i, seen, fields == JOIN_FIELDS)
  end
  for index, members in pairs(seen.members) do
    for first = 1, #members, 2 * ZADD_SLICE do
      local last = math.min(first + 2 * ZADD_SLICE - 1, #members)
      redis.call('ZADD', index, unpack(members, first, last))
    end
    extend(index, ttl)
  end
  -- Only indexes that gained an entry: a refused one may not exist. A user index created here
  -- has no expiry yet; any other has one (every write sets it), which is only pushed out.
  for index, created in pairs(seen.gained) do
    if created then
      redis.call('EXPIRE', index, ttl)
    else
      redis.call('EXPIRE', index, ttl, 'GT')
    end
  end
  return answers
end

local function sse_admit(keys, args)
  return admit(keys, args, ADMIT_FIELDS, 'sse_admit')
end

local function sse_join(keys, args)
  return admit(keys, args, JOIN_FIELDS, 'sse_join')
end

redis.register_function('sse_publish', sse_publish)
redis.register_function('sse_admit', sse_admit)
redis.register_function('sse_join', sse_join)
redis.register_function('sse_registry', sse_registry)
redis.register_function('sse_position', sse_position)
redis.register_function('sse_probe', sse_probe)
redis.register_function({ function_name = 'sse_since', callback = sse_since, flags = { 'no-writes' } })
redis.register_function({ function_name = 'sse_backlog', callback = sse_backlog, flags = { 'no-writes' } })
redis.register_function({ function_name = 'sse_list', callback = sse_list, flags = { 'no-writes' } })
