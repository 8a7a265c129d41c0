-- create_deal: store a new deal, index it for discovery, and log it for the persister.
--
-- A deal that has started (by Redis's clock) enters the geo index, and the ends index so
-- that it leaves when it ends; a scheduled one waits in the starts index instead, out of
-- every search, until discovery moves it (lua/search_geo.lua); one already ended is
-- indexed nowhere.
--
-- KEYS[1]  deal hash            fs:{pNN}:deal:<id>
-- KEYS[2]  partition stream     fs:{pNN}:events
-- KEYS[3]  partition geo index  fs:{pNN}:geo
-- KEYS[4]  scheduled deals      fs:{pNN}:geo:starts   (deal id by starts ms)
-- KEYS[5]  indexed deals' ends  fs:{pNN}:geo:ends     (deal id by ends ms)
-- KEYS[6]  partition archive index  fs:{pNN}:archive   deal id -> archive time ms
-- ARGV[1]  stream cap (entries)
-- ARGV[2]  deal id      ARGV[3] merchant id   ARGV[4] title   ARGV[5] description
-- ARGV[6]  lat          ARGV[7] lng           ARGV[8] inventory total
-- ARGV[9]  starts_at ms ARGV[10] ends_at ms   ARGV[11] redeem_until ms
-- ARGV[12] archive time ms (redeem_until + grace): the archiver takes the deal from then
-- ARGV[13] deadline ms, later than ARGV[12]: the deal hash expires then (PEXPIREAT) if no
--          archiver took it; the deal's other keys take the same deadline when created
--
-- Returns {outcome, created_at_ms}; outcome is 'created' | 'exists' | 'backlog_full'.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists', 0}
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[1]) then
  return {'backlog_full', 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1],
  'merchant', ARGV[3], 'title', ARGV[4], 'desc', ARGV[5],
  'lat', ARGV[6], 'lng', ARGV[7], 'total', ARGV[8], 'left', ARGV[8], 'seq', 0,
  'starts', ARGV[9], 'ends', ARGV[10], 'redeem', ARGV[11], 'created', now)
redis.call('PEXPIREAT', KEYS[1], ARGV[13])
redis.call('ZADD', KEYS[6], ARGV[12], ARGV[2])
if tonumber(ARGV[9]) > now then
  redis.call('ZADD', KEYS[4], ARGV[9], ARGV[2])
elseif tonumber(ARGV[10]) > now then
  redis.call('GEOADD', KEYS[3], ARGV[7], ARGV[6], ARGV[2])
  redis.call('ZADD', KEYS[5], ARGV[10], ARGV[2])
end
redis.call('XADD', KEYS[2], '*',
  'type', 'deal', 'deal', ARGV[2], 'merchant', ARGV[3], 'title', ARGV[4], 'desc', ARGV[5],
  'lat', ARGV[6], 'lng', ARGV[7], 'total', ARGV[8],
  'starts', ARGV[9], 'ends', ARGV[10], 'redeem', ARGV[11], 'at', now)
return {'created', now}
