-- sweep_geo: check some members of a partition's geo index against their deals.
--
-- KEYS[1]  partition geo index   fs:{pNN}:geo
-- KEYS[2]  scheduled deals       fs:{pNN}:geo:starts   (deal id by starts ms)
-- KEYS[3]  indexed deals' ends   fs:{pNN}:geo:ends     (deal id by ends ms)
-- ARGV[1]  deal hash name prefix fs:{pNN}:deal:
-- ARGV[2..] deal ids, members of KEYS[1] (a ZSCAN step)
--
-- By this node's clock: a member whose deal is gone, cancelled, sold out or ended leaves
-- the index; one not started yet (written by an older version, or rebuilt from
-- PostgreSQL) moves to the scheduled deals; a claimable one is entered in the ends index
-- (again: ZADD is idempotent), so that it leaves the index when it ends.
--
-- Returns {removed, moved to the scheduled deals}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local removed, moved = 0, 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local d = redis.call('HMGET', ARGV[1] .. id, 'left', 'cancelled', 'starts', 'ends')
  local left, starts, ends = tonumber(d[1] or 0), tonumber(d[3] or 0), tonumber(d[4] or 0)
  if not d[1] or d[2] or left <= 0 or ends <= now then
    removed = removed + redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[3], id)
  elseif starts > now then
    moved = moved + redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZADD', KEYS[2], starts, id)
  else
    redis.call('ZADD', KEYS[3], ends, id)
  end
end
return {removed, moved}
