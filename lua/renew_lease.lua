-- renew_lease: extend a consumer-name lease we hold, or take it back if it lapsed and
-- nobody took it meanwhile. Atomic, so it never overwrites a lease another process took
-- (a GET then a SET from the client could, after ours expired).
--
-- KEYS[1]  lease  fs:persister:lease:<name>
-- ARGV[1]  our token (pid and random bytes)
-- ARGV[2]  time to live (ms)
--
-- Returns 1 if the lease is ours for ARGV[2] ms from now, 0 if another process holds it.
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
