-- release_lease: drop a consumer-name lease, only if it is still ours (atomic, like
-- renew_lease).
--
-- KEYS[1]  lease  fs:persister:lease:<name>
-- ARGV[1]  our token
--
-- Returns 1 if the lease was ours and is gone, 0 if it was not ours (left alone).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
