-- archive_deal: remove a deal's keys once the archiver found every event of it in
-- PostgreSQL (and marked deals.archived_at), refusing if anything changed since it looked.
--
-- KEYS[1]  deal hash                fs:{pNN}:deal:<id>
-- KEYS[2]  claimers hash            fs:{pNN}:claimers:<id>
-- KEYS[3]  vouchers hash            fs:{pNN}:vouchers:<id>
-- KEYS[4]  redemptions hash         fs:{pNN}:redeemed:<id>
-- KEYS[5]  partition archive index  fs:{pNN}:archive
-- KEYS[6]  partition geo index      fs:{pNN}:geo
-- KEYS[7]  scheduled deals          fs:{pNN}:geo:starts
-- KEYS[8]  indexed deals' ends      fs:{pNN}:geo:ends
-- ARGV[1]  deal id
-- ARGV[2]  seq the archiver checked (vouchers issued)
-- ARGV[3]  cancelled the archiver checked ('' = not cancelled)
-- ARGV[4]  first redemptions the archiver checked (the redemptions hash's length)
--
-- Returns {outcome, detail}; outcome is
--   'archived'  the four keys are gone (UNLINK: a big hash is freed off the main thread),
--               and the deal has left the partition's indexes (archive, geo, starts, ends)
--   'gone'      no deal hash (archived before, or its deadline passed): whatever is left
--               of the deal goes, as above
--   'changed'   the deal changed since the archiver looked (detail names what): nothing
--               removed; the archiver looks again on its next pass
-- A claim, a cancellation and a first redemption each change one of the values checked;
-- a redemption conflict changes nothing here (its event alone carries it to PostgreSQL).
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  redis.call('ZREM', KEYS[8], ARGV[1])
  return {'gone', ''}
end
local d = redis.call('HMGET', KEYS[1], 'seq', 'cancelled')
if (d[1] or '0') ~= ARGV[2] then
  return {'changed', 'seq'}
end
if (d[2] or '') ~= ARGV[3] then
  return {'changed', 'cancelled'}
end
if tostring(redis.call('HLEN', KEYS[4])) ~= ARGV[4] then
  return {'changed', 'redemptions'}
end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('ZREM', KEYS[8], ARGV[1])
return {'archived', ''}
