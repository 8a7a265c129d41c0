-- cancel_deal: stop new claims at once; issued vouchers stay valid. Idempotent.
--
-- KEYS[1]  deal hash            fs:{pNN}:deal:<id>
-- KEYS[2]  partition stream     fs:{pNN}:events
-- KEYS[3]  partition geo index  fs:{pNN}:geo
-- ARGV[1]  caller (merchant) id
-- ARGV[2]  deal id
-- ARGV[3]  stream cap (entries)
--
-- Returns {outcome, cancelled_at_ms}; outcome is
--   'cancelled' (now or earlier) | 'not_found' | 'forbidden' | 'backlog_full'.
local d = redis.call('HMGET', KEYS[1], 'merchant', 'cancelled')
if not d[1] then
  return {'not_found', 0}
end
if d[1] ~= ARGV[1] then
  return {'forbidden', 0}
end
if d[2] then
  return {'cancelled', tonumber(d[2])}
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then
  return {'backlog_full', 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'cancelled', now)
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'type', 'cancel', 'deal', ARGV[2], 'at', now)
return {'cancelled', now}
