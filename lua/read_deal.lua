-- read_deal: a deal's fields with Redis's clock, so status is judged as claims judge it.
--
-- KEYS[1]  deal hash  fs:{pNN}:deal:<id>
--
-- Returns {now_ms, field1, value1, field2, value2, ...}; only {now_ms} if no such deal.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, now)
return out
