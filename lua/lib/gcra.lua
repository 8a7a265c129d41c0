-- charge: one request counted against its subjects' rate limits (GCRA), atomically.
-- Included by limit_rate.lua (every limited route) and claim_voucher.lua (the claim on
-- one node, where its limits and its race are one call); the model is stated there.
--
-- KEYS[first_key..#KEYS]  limiter keys, one per subject: the subject's theoretical
--                         arrival time (TAT), microseconds of Redis's clock
-- ARGV[first_arg + 2(i-1)], the next  the i-th key's interval and burst window, us
--
-- Each key whose subject may send now counts the request (its TAT moves one interval
-- on); a key that refuses changes nothing. Returns now (us), and, if some key refused,
-- which (1 for the first key) and after how long it would allow the request (us): the
-- longest such wait, the first key giving it; nil and 0 when every key allowed.
local function charge(first_key, first_arg)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local refused_by, retry = nil, 0
  for i = first_key, #KEYS do
    local a = first_arg + 2 * (i - first_key)
    local interval, window = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
    if tat < now then
      tat = now
    end
    local ahead = tat + interval - now
    if ahead > window then
      if ahead - window > retry then
        refused_by, retry = i - first_key + 1, ahead - window
      end
    else
      -- Lives while ahead of schedule (+ 1 ms for the rounding of expiry times to ms):
      -- an idle subject leaves nothing behind.
      redis.call('SET', KEYS[i], string.format('%d', tat + interval),
        'PX', math.ceil(ahead / 1000) + 1)
    end
  end
  return now, refused_by, retry
end
