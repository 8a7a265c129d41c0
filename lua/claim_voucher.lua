-- claim_voucher: decide one claim atomically. The only place stock is taken.
--
-- KEYS[1]  deal hash            fs:{pNN}:deal:<id>
-- KEYS[2]  claimers hash        fs:{pNN}:claimers:<id>   user id -> "voucher|seq|claimed_at_ms"
-- KEYS[3]  partition stream     fs:{pNN}:events
-- KEYS[4]  partition geo index  fs:{pNN}:geo
-- KEYS[5]  vouchers hash        fs:{pNN}:vouchers:<id>   voucher id -> user id
-- ARGV[1]  user id
-- ARGV[2]  voucher id to issue if this is a new claim (unused otherwise)
-- ARGV[3]  stream cap (entries)
-- ARGV[4]  deal id
-- KEYS[6..], ARGV[5..]  optional: the caller's rate limiter keys and their interval and
--           burst window in pairs (lib/gcra.lua). One node only: a limiter key is its
--           own hash slot, so on a cluster the limits are a call of their own.
--
-- Returns {outcome, voucher_id, seq, claimed_at_ms, inventory_left, merchant_id, redeem_until_ms};
-- outcome is
--   'claimed' | 'already'   (voucher fields set)
--   'not_found' | 'cancelled' | 'not_started' | 'ended' | 'sold_out' | 'backlog_full'
--   'rate_limited'  {'rate_limited', retry_after_us, refused_by (the limiter key's index)}
-- A new voucher's hashes take the deal hash's deadline (PEXPIRETIME: the archiver's
-- backstop, see create_deal), so that nothing of the deal outlives it.
-- Checks run in the API's order: a holder gets its voucher back whatever the deal's
-- state; then existence, cancellation, the time window (Redis's clock), stock, backlog.
-- Before all of them, the rate limits (API.md: refused before any other work): a limited
-- claim reads and writes nothing else.

-- #include gcra

if #KEYS > 5 then
  local _, refused_by, retry = charge(6, 5)
  if refused_by then
    return {'rate_limited', retry, refused_by}
  end
end
local held = redis.call('HGET', KEYS[2], ARGV[1])
local d = redis.call('HMGET', KEYS[1], 'left', 'starts', 'ends', 'cancelled', 'merchant', 'redeem')
local left = tonumber(d[1])
if held then
  local vid, seq, at = string.match(held, '^([^|]*)|([^|]*)|(.*)$')
  return {'already', vid, tonumber(seq), tonumber(at), left or 0, d[5] or '', tonumber(d[6]) or 0}
end
if not left then
  return {'not_found', '', 0, 0, 0}
end
if d[4] then
  return {'cancelled', '', 0, 0, left}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(d[2]) then
  return {'not_started', '', 0, 0, left}
end
if now >= tonumber(d[3]) then
  return {'ended', '', 0, 0, left}
end
if left <= 0 then
  return {'sold_out', '', 0, 0, 0}
end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[3]) then
  return {'backlog_full', '', 0, 0, left}
end
left = redis.call('HINCRBY', KEYS[1], 'left', -1)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '|' .. seq .. '|' .. now)
redis.call('HSET', KEYS[5], ARGV[2], ARGV[1])
local deadline = redis.call('PEXPIRETIME', KEYS[1])
if deadline > 0 then
  redis.call('PEXPIREAT', KEYS[2], deadline)
  redis.call('PEXPIREAT', KEYS[5], deadline)
end
redis.call('XADD', KEYS[3], '*',
  'type', 'claim', 'deal', ARGV[4], 'seq', seq, 'voucher', ARGV[2], 'user', ARGV[1], 'at', now)
if left <= 0 then
  -- Sold out: discovery must never show it again.
  redis.call('ZREM', KEYS[4], ARGV[4])
end
return {'claimed', ARGV[2], seq, now, left, d[5], tonumber(d[6])}
