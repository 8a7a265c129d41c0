-- search_geo: partition geo indexes near one or more centres, at a cost known and
-- bounded before it is paid; each partition's timeline is moved on first.
--
-- Per partition p = 0, 1, ... of the call (on a Redis Cluster, one partition per call):
-- KEYS[3p+1]  geo index             fs:{pNN}:geo
-- KEYS[3p+2]  scheduled deals       fs:{pNN}:geo:starts   (deal id by starts ms)
-- KEYS[3p+3]  indexed deals' ends   fs:{pNN}:geo:ends     (deal id by ends ms)
-- ARGV[1]  timeline chunk: due starts, and due ends, handled per partition at most
-- ARGV[2]  COUNT: members returned per partition and centre at most (the nearest)
-- ARGV[3]  scan budget: members the boxes of a radius searched in one partition may hold
-- ARGV[4+p] partition p's deal hash name prefix fs:{pNN}:deal:
-- then     the number of centres (0: only move the timelines on), and per centre:
--          lng, lat, members wanted per partition (0: the widest radius within budget),
--          km any radius needs on top of the one that should hold them (as GEOSEARCH
--          measures), the number of rungs, then per rung (widest first): radius (km as
--          GEOSEARCH measures), area of its boxes (km2), the number of boxes' score
--          ranges, then each range's lo and hi ([lo, hi), engine/geohash.py). The counts
--          in a rung's boxes never grow down a ladder, nor for a smaller radius.
--
-- The timeline: scheduled deals whose start has come (by this node's clock) enter the
-- geo index if still claimable (their hash exists, is not cancelled, has stock left and
-- has not ended), and the ends index with them; indexed deals whose end has come leave
-- both. Neither is walked: both are read by score, ARGV[1] at a time.
--
-- The search, per centre: the members of a rung's boxes (ZCOUNT per box) in the first
-- partition give the density around the centre; the radius that should hold `want`
-- members at that density, plus `extra`, is covered by a narrower rung, whose boxes tell
-- the density closer in (at most DENSITY_ROUNDS times). Each partition searches that
-- radius if the boxes of the narrowest rung covering it hold at most ARGV[3] of its
-- members (one ZCOUNT over the score range enclosing them, or one per box if that is
-- over), else the widest rung whose boxes do (a binary search down the ladder), with
-- GEOSEARCH ... COUNT ARGV[2] ASC: it reads at most ARGV[3] members and returns at most
-- ARGV[2], whose scores (their 52-bit geohashes: where the index puts them) follow.
--
-- Returns {now_ms, backlog, deal hashes read,
--          then per partition, per centre: radius searched (km as GEOSEARCH measures, a
--          string; '0' if no rung fits the budget), members counted in the boxes it may
--          read, n, then n members nearest first, then their n scores}
-- backlog is 1 when due starts or ends may be left for a later call.
local DENSITY_ROUNDS = 3
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local chunk = tonumber(ARGV[1])
local backlog, read = 0, 0
local partitions = #KEYS / 3

if chunk > 0 then
  for p = 0, partitions - 1 do
    local geo, starts, ends = KEYS[3 * p + 1], KEYS[3 * p + 2], KEYS[3 * p + 3]
    local due = redis.call('ZRANGEBYSCORE', starts, '-inf', now, 'LIMIT', 0, chunk)
    for _, id in ipairs(due) do
      local d = redis.call('HMGET', ARGV[4 + p] .. id, 'lat', 'lng', 'left', 'cancelled', 'ends')
      read = read + 1
      if d[1] and not d[4] and tonumber(d[3] or 0) > 0 and tonumber(d[5] or 0) > now then
        redis.call('GEOADD', geo, d[2], d[1], id)
        redis.call('ZADD', ends, d[5], id)
      end
    end
    if #due > 0 then
      redis.call('ZREM', starts, unpack(due))
    end
    local ended = redis.call('ZRANGEBYSCORE', ends, '-inf', now, 'LIMIT', 0, chunk)
    if #ended > 0 then
      redis.call('ZREM', geo, unpack(ended))
      redis.call('ZREM', ends, unpack(ended))
    end
    if #due == chunk or #ended == chunk then
      backlog = 1
    end
  end
end

local out = {now, backlog, read}
local n = 3
local count, budget = ARGV[2], tonumber(ARGV[3])

-- Members of `key` in a rung's boxes ({km, km2, lo, hi, lo, hi ...}), stopping past `most`.
local function tally(key, rung, most)
  local total = 0
  for i = 3, #rung, 2 do
    total = total + redis.call('ZCOUNT', key, rung[i], '(' .. rung[i + 1])
    if total > most then
      return total
    end
  end
  return total
end

-- At least the members of `key` in a rung's boxes, and at most `most` if it can be:
-- first one ZCOUNT over the range enclosing them all (ranges are sorted), then per box.
local function bound(key, rung, most)
  if #rung > 4 then
    local total = redis.call('ZCOUNT', key, rung[3], '(' .. rung[#rung])
    if total <= most then
      return total
    end
  end
  return tally(key, rung, most)
end

-- The narrowest rung from `k` on whose radius is at least `km`.
local function covering(ladder, k, km)
  while k < #ladder and tonumber(ladder[k + 1][1]) >= km do
    k = k + 1
  end
  return k
end

-- The centres and their ladders, from ARGV.
local centres = {}
local a = 4 + partitions
local ncentres = tonumber(ARGV[a] or 0)
a = a + 1
for _ = 1, ncentres do
  local head = {ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])}
  local parts = {}
  a = a + 5
  for r = 1, tonumber(ARGV[a - 1]) do
    local ranges = tonumber(ARGV[a + 2])
    local rung = {ARGV[a], ARGV[a + 1]}
    for i = 1, 2 * ranges do
      rung[2 + i] = ARGV[a + 2 + i]
    end
    parts[r] = rung
    a = a + 3 + 2 * ranges
  end
  local want, extra = head[3], head[4]
  -- The radius to search, from the first partition's density (or the widest rung).
  local radius, pick = tonumber(parts[1][1]), 1
  if want > 0 and partitions > 0 then
    local c = tally(KEYS[1], parts[1], math.huge)
    for _ = 1, DENSITY_ROUNDS do
      if c == 0 then
        break
      end
      local need = math.sqrt(want * tonumber(parts[pick][2]) / (math.pi * c)) + extra
      if need >= radius then
        break
      end
      radius = need
      local k = covering(parts, pick, need)
      if k == pick then
        break
      end
      pick = k
      c = tally(KEYS[1], parts[pick], math.huge)
    end
  end
  centres[#centres + 1] = {lng = head[1], lat = head[2], ladder = parts, pick = pick,
    radius = radius}
end

for p = 0, partitions - 1 do
  local geo = KEYS[3 * p + 1]
  for _, centre in ipairs(centres) do
    local ladder, pick, radius = centre.ladder, centre.pick, centre.radius
    local c = bound(geo, ladder[pick], budget)
    if c > budget then
      -- Over budget here: the widest narrower rung within it (binary search).
      local lo, hi = pick + 1, #ladder + 1
      while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        local m = bound(geo, ladder[mid], budget)
        if m <= budget then
          hi, c = mid, m
        else
          lo = mid + 1
        end
      end
      pick = lo
      if pick <= #ladder then
        radius = tonumber(ladder[pick][1])
      end
    end
    if pick <= #ladder then
      local km = string.format('%.17g', radius)
      local found = redis.call('GEOSEARCH', geo, 'FROMLONLAT', centre.lng, centre.lat,
        'BYRADIUS', km, 'km', 'COUNT', count, 'ASC')
      out[n + 1], out[n + 2], out[n + 3] = km, c, #found
      n = n + 3
      if #found > 0 then
        local scores = redis.call('ZMSCORE', geo, unpack(found))
        for i = 1, #found do
          out[n + i] = found[i]
          out[n + #found + i] = scores[i]
        end
        n = n + 2 * #found
      end
    else
      out[n + 1], out[n + 2], out[n + 3] = '0', c, 0
      n = n + 3
    end
  end
end
return out
