-- redeem_voucher: decide one redemption atomically. First accepted wins; later ones
-- (from another entry) are conflicts, kept for review, never dropped.
--
-- KEYS[1]  redemptions hash     fs:{pNN}:redeemed:<deal>  voucher id -> first accepted redemption
-- KEYS[2]  vouchers hash        fs:{pNN}:vouchers:<deal>  voucher id -> user id
-- KEYS[3]  claimers hash        fs:{pNN}:claimers:<deal>  user id -> "voucher|seq|claimed_at_ms"
-- KEYS[4]  partition stream     fs:{pNN}:events
-- KEYS[5]  merchant feed        fs:{pNN}:merchant-redemptions:<merchant hex>  (a stream)
-- ARGV[1]  voucher id (the token's jti, already verified)
-- ARGV[2]  deal id
-- ARGV[3]  user id (the token's sub)
-- ARGV[4]  merchant id (the caller; equal to the token's aud)
-- ARGV[5]  device id   ('' for an online redemption)
-- ARGV[6]  entry id    ('' for an online redemption)
-- ARGV[7]  redeemed at, ms ('' = now, by Redis's clock: online redemptions)
-- ARGV[8]  voucher exp, ms (the token's exp * 1000)
-- ARGV[9]  allowed device clock drift, ms, either way: a time later than now + drift, or
--          earlier than the voucher's claim - drift, is implausible (0 online)
-- ARGV[10] stream cap (entries)
-- ARGV[11] feed retention, ms: entries accepted longer ago than this are trimmed
-- ARGV[12] feed minimum time to live, ms (see below)
--
-- Redemptions hash value: "<at_ms>|<device>|<entry>|<merchant>". device and entry are
-- URL-safe ids without '|' (or empty for online); merchant goes last because a caller id
-- may hold any character. PostgreSQL's redemptions row (redeemed_at, device_id, entry_id,
-- merchant_id) restores it.
--
-- The redemptions hash takes the claimers hash's deadline (the deal's, see create_deal).
--
-- Feed entry (each first accepted redemption, nothing else; engine/feed.py feed_fields):
--   voucher <id>  at <redeemed at, ms>  device <device id, '' online>
-- The feed stream expires when the last voucher it names does (but never sooner than
-- ARGV[12] from now: an offline redemption synced after its voucher expired must not
-- delete the stream). It is the merchant's, shared by all its deals in the partition: it
-- takes no deal's deadline and archive_deal leaves it; its own expiry (the latest voucher
-- exp it names, at most the longest voucher life) removes it after the last one.
--
-- Returns {outcome, at_ms, first_at_ms}; outcome is
--   'accepted'       the first redemption (at_ms = first_at_ms = its time), or the same
--                    entry of the same merchant arriving again (replay after a crash:
--                    no second event)
--   'already'        online only: already redeemed (nothing recorded: the till refused)
--   'conflict'       sync only: redeemed before by another entry; a redeem_conflict
--                    event is logged (a replay of the same entry logs it again: the
--                    persister keys conflicts on voucher, merchant and entry)
--   'unknown'        no such voucher here (or it belongs to another user)
--   'implausible'    the time is later than now + drift, or earlier than claimed - drift
--   'expired'        the time is at or after exp
--   'backlog_full'   the stream is at its cap: nothing recorded
-- Events: type=redeem  deal voucher merchant at device entry
--         type=redeem_conflict  deal voucher merchant at device entry first_at
local user = redis.call('HGET', KEYS[2], ARGV[1])
if not user or user ~= ARGV[3] then
  return {'unknown', 0, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at = now
if ARGV[7] ~= '' then
  at = tonumber(ARGV[7])
end
local first = redis.call('HGET', KEYS[1], ARGV[1])
local first_at, first_device, first_entry, first_merchant
if first then
  first_at, first_device, first_entry, first_merchant =
    string.match(first, '^(%d+)|([^|]*)|([^|]*)|(.*)$')
  first_at = tonumber(first_at)
  if ARGV[6] ~= '' and first_entry == ARGV[6] and first_merchant == ARGV[4] then
    return {'accepted', first_at, first_at}
  end
end
local drift = tonumber(ARGV[9])
if at > now + drift then
  return {'implausible', at, first_at or 0}
end
local held = redis.call('HGET', KEYS[3], user)
if held then
  local claimed_at = tonumber(string.match(held, '|([^|]*)$'))
  if claimed_at and at < claimed_at - drift then
    return {'implausible', at, first_at or 0}
  end
end
if at >= tonumber(ARGV[8]) then
  return {'expired', at, first_at or 0}
end
if first then
  if ARGV[6] == '' then
    return {'already', at, first_at}
  end
  if redis.call('XLEN', KEYS[4]) >= tonumber(ARGV[10]) then
    return {'backlog_full', at, first_at}
  end
  redis.call('XADD', KEYS[4], '*',
    'type', 'redeem_conflict', 'deal', ARGV[2], 'voucher', ARGV[1], 'merchant', ARGV[4],
    'at', at, 'device', ARGV[5], 'entry', ARGV[6], 'first_at', first_at)
  return {'conflict', at, first_at}
end
if redis.call('XLEN', KEYS[4]) >= tonumber(ARGV[10]) then
  return {'backlog_full', at, 0}
end
redis.call('HSET', KEYS[1], ARGV[1], at .. '|' .. ARGV[5] .. '|' .. ARGV[6] .. '|' .. ARGV[4])
local deadline = redis.call('PEXPIRETIME', KEYS[3])
if deadline > 0 then
  redis.call('PEXPIREAT', KEYS[1], deadline)
end
redis.call('XADD', KEYS[4], '*',
  'type', 'redeem', 'deal', ARGV[2], 'voucher', ARGV[1], 'merchant', ARGV[4],
  'at', at, 'device', ARGV[5], 'entry', ARGV[6])
redis.call('XADD', KEYS[5], 'MINID', '~', now - tonumber(ARGV[11]), '*',
  'voucher', ARGV[1], 'at', at, 'device', ARGV[5])
local keep_until = math.max(tonumber(ARGV[8]), now + tonumber(ARGV[12]))
if redis.call('PEXPIREAT', KEYS[5], keep_until, 'NX') == 0 then
  redis.call('PEXPIREAT', KEYS[5], keep_until, 'GT')
end
return {'accepted', at, at}
