-- read_deals: the live fields of several deals, with Redis's clock, so status is judged
-- as claims judge it (discovery reads its nearest candidates with it).
--
-- KEYS[i]  deal hash  fs:{pNN}:deal:<id> (on a Redis Cluster, all of one partition)
-- ARGV[i]  '1': also read KEYS[i]'s fixed fields (the caller has not seen the deal yet);
--          '0': only the fields that change (left, cancelled, seq)
--
-- Returns {now_ms, then per key: left, cancelled, seq
--          [, merchant, title, desc, lat, lng, total, starts, ends, redeem]};
-- a missing field is nil (a missing deal has a nil `left`).
local t = redis.call('TIME')
local out = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
local n = 1
for i, key in ipairs(KEYS) do
  local v
  if ARGV[i] == '1' then
    v = redis.call('HMGET', key, 'left', 'cancelled', 'seq', 'merchant', 'title', 'desc',
      'lat', 'lng', 'total', 'starts', 'ends', 'redeem')
  else
    v = redis.call('HMGET', key, 'left', 'cancelled', 'seq')
  end
  for j = 1, #v do
    n = n + 1
    out[n] = v[j]
  end
end
return out
