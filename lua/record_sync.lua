-- record_sync: remember the first results of a merchant's synced entries, at most a
-- fixed number per voucher, so that a merchant's sync state is bounded by its vouchers.
--
-- KEYS[1]  the merchant's sync hash of one month  fs:sync:<hex merchant>:<YYYYMM>
--            (the month its vouchers expire in: every voucher named here expires in it)
--            <entry id>    -> the entry's first result (packed JSON, engine/redemptions.py)
--            #<voucher id> -> how many entries naming that voucher are kept (entry ids
--                             are URL-safe: none starts with '#')
-- ARGV[1]  kept entries per voucher, at most (an accepted one is kept beyond it: there is
--          at most one per voucher, the first redemption)
-- ARGV[2]  when the hash expires, ms (PEXPIREAT: the same on every write, never renewed)
-- ARGV[3..] groups of four: entry id, voucher id, packed result, '1' if accepted else '0'
--
-- Returns one integer per group, in order: 1 kept; 0 not kept (the voucher has its
-- quota of kept entries); 2 the entry was kept already (a concurrent upload won).
local cap = tonumber(ARGV[1])
local out = {}
local kept = false
for i = 3, #ARGV, 4 do
  local entry, voucher, packed, accepted = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HEXISTS', KEYS[1], entry) == 1 then
    out[#out + 1] = 2
  else
    local count = tonumber(redis.call('HGET', KEYS[1], '#' .. voucher) or 0)
    if count < cap or accepted == '1' then
      redis.call('HSET', KEYS[1], entry, packed)
      redis.call('HINCRBY', KEYS[1], '#' .. voucher, 1)
      kept = true
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
end
if kept then
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return out
