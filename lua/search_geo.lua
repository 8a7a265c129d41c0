-- search_geo: one partition's geo index near one or more centres, at a cost known and
-- bounded before it is paid; the partition's timeline is moved on first.
--
-- KEYS[1]  partition geo index   fs:{pNN}:geo
-- KEYS[2]  scheduled deals       fs:{pNN}:geo:starts   (deal id by starts ms)
-- KEYS[3]  indexed deals' ends   fs:{pNN}:geo:ends     (deal id by ends ms)
-- ARGV[1]  deal hash name prefix fs:{pNN}:deal:
-- ARGV[2]  timeline chunk: due starts, and due ends, handled per call at most
-- ARGV[3]  COUNT: members returned per centre at most (the nearest)
-- ARGV[4]  scan budget: members the boxes of a searched radius may hold at most
-- ARGV[5]  centres: '' (only move the timeline on), or
--          'lng lat / km lo hi lo hi ... / km lo hi ... ; lng lat / ...'
--          a ladder of radii per centre (km as GEOSEARCH measures), widest first, each
--          with the score ranges [lo, hi) of every geohash box GEOSEARCH may read for it
--          (engine/geohash.py); the counts in those boxes never grow down a ladder.
--
-- The timeline: scheduled deals whose start has come (by this node's clock) enter the
-- geo index if still claimable (their hash exists, is not cancelled, has stock left and
-- has not ended), and the ends index with them; indexed deals whose end has come leave
-- both. Neither is walked: both are read by score, ARGV[2] at a time.
--
-- The search: per centre, the widest rung whose boxes hold at most ARGV[4] members
-- (ZCOUNT per box; a binary search down the ladder) is searched with
-- GEOSEARCH ... COUNT ARGV[3] ASC WITHCOORD, so it reads at most ARGV[4] members and
-- returns at most ARGV[3].
--
-- Returns {now_ms, backlog, deal hashes read,
--          then per centre: rung (1-based; 0: none fits the budget), members counted in
--          its boxes, n, then n x (member, lng, lat), nearest first}
-- backlog is 1 when due starts or ends may be left for a later call.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local chunk = tonumber(ARGV[2])
local backlog, read = 0, 0
if chunk > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, chunk)
  for _, id in ipairs(due) do
    local d = redis.call('HMGET', ARGV[1] .. id, 'lat', 'lng', 'left', 'cancelled', 'ends')
    read = read + 1
    if d[1] and not d[4] and tonumber(d[3] or 0) > 0 and tonumber(d[5] or 0) > now then
      redis.call('GEOADD', KEYS[1], d[2], d[1], id)
      redis.call('ZADD', KEYS[3], d[5], id)
    end
  end
  if #due > 0 then
    redis.call('ZREM', KEYS[2], unpack(due))
  end
  local ended = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, chunk)
  if #ended > 0 then
    redis.call('ZREM', KEYS[1], unpack(ended))
    redis.call('ZREM', KEYS[3], unpack(ended))
  end
  if #due == chunk or #ended == chunk then
    backlog = 1
  end
end

local out = {now, backlog, read}
local n = 3
local count, budget = ARGV[3], tonumber(ARGV[4])

-- Members in a rung's boxes, stopping as soon as the budget is passed.
local function tally(rung)
  local total = 0
  for i = 2, #rung, 2 do
    total = total + redis.call('ZCOUNT', KEYS[1], rung[i], '(' .. rung[i + 1])
    if total > budget then
      return total
    end
  end
  return total
end

for centre in string.gmatch(ARGV[5], '[^;]+') do
  local parts = {}
  for part in string.gmatch(centre, '[^/]+') do
    local words = {}
    for w in string.gmatch(part, '%S+') do
      words[#words + 1] = w
    end
    parts[#parts + 1] = words
  end
  -- The widest rung within budget: counts never grow down the ladder (parts[2..]).
  local counts = {}
  local lo, hi = 2, #parts + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    counts[mid] = tally(parts[mid])
    if counts[mid] <= budget then
      hi = mid
    else
      lo = mid + 1
    end
  end
  if lo <= #parts then
    local found = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', parts[1][1], parts[1][2],
      'BYRADIUS', parts[lo][1], 'km', 'COUNT', count, 'ASC', 'WITHCOORD')
    out[n + 1], out[n + 2], out[n + 3] = lo - 1, counts[lo], #found
    n = n + 3
    for i = 1, #found do
      local row = found[i]
      out[n + 1] = row[1]
      out[n + 2] = row[2][1]
      out[n + 3] = row[2][2]
      n = n + 3
    end
  else
    out[n + 1], out[n + 2], out[n + 3] = 0, counts[#parts] or 0, 0
    n = n + 3
  end
end
return out
