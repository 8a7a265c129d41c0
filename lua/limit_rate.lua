-- limit_rate: one request against its subjects' rate limits (GCRA), decided atomically.
--
-- Each key holds its subject's theoretical arrival time (TAT, in microseconds of Redis's
-- clock): when its next request would be on schedule. A request is allowed when, after
-- adding one interval, the TAT is at most one burst window ahead of now; a refused
-- request changes nothing. The key lives as long as the TAT is ahead of now (at most the
-- burst window, + 1 ms for the rounding to ms of expiry times): an idle subject leaves
-- nothing behind, and a missing key means "on schedule", as an expired one would have.
-- With several keys (one node: a caller's and an address's limit in one call), each key
-- that allows the request counts it, even when another refuses it.
--
-- KEYS[i]      limiter key          fs:{rl:<kind>:<subject hash>}   TAT, microseconds
-- ARGV[2i-1]   interval, us (one request's share: 1e6 / rate)
-- ARGV[2i]     burst window, us (burst * interval: how far ahead of now the TAT may run)
--
-- Returns {allowed (1|0), retry_after_us (0 when allowed), now_us (Redis's TIME),
-- refused_by (the refusing key's index, 1-based; 0 when allowed)}.

-- #include gcra

local now, refused_by, retry = charge(1, 1)
if refused_by then
  return {0, retry, now, refused_by}
end
return {1, 0, now, 0}
