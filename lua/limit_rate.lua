-- limit_rate: one request against one subject's rate limit (GCRA), decided atomically.
--
-- The key holds the subject's theoretical arrival time (TAT, in microseconds of Redis's
-- clock): when its next request would be on schedule. A request is allowed when, after
-- adding one interval, the TAT is at most one burst window ahead of now; a refused
-- request changes nothing. The key lives as long as the TAT is ahead of now (at most the
-- burst window, + 1 ms for the rounding to ms of expiry times): an idle subject leaves
-- nothing behind, and a missing key means "on schedule", as an expired one would have.
--
-- KEYS[1]  limiter key          fs:{rl:<kind>:<subject hash>}   TAT, microseconds
-- ARGV[1]  interval, us (one request's share: 1e6 / rate)
-- ARGV[2]  burst window, us (burst * interval: how far ahead of now the TAT may run)
--
-- Returns {allowed (1|0), retry_after_us (0 when allowed), now_us (Redis's TIME)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then
  tat = now
end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > window then
  return {0, ahead - window, now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat),
  'PX', math.ceil(ahead / 1000) + 1)
return {1, 0, now}
