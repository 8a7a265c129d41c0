-- wrk script for loadtest.bench: POST to one path, each request with the next caller token.
--
-- env BENCH_PATH     the path to POST to (e.g. /v1/deals/d_x/claims)
-- env BENCH_TOKENS   a file of caller tokens, one a line; thread i of n uses tokens
--                    i, i+n, i+2n... (round-robin, so wrapping around is a repeat caller)
-- env BENCH_THREADS  wrk's -t (the stride)
-- Prints "status <code> <count>" per response status at the end, then "tokens <n>".
dofile(os.getenv("BENCH_REPORT"))  -- threads, statuses, response(), done()
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  register(thread)
end

local tokens, count, pos, stride
local prefix, suffix

function init(args)
  tokens = {}
  for line in io.lines(os.getenv("BENCH_TOKENS")) do
    tokens[#tokens + 1] = line
  end
  count = #tokens
  stride = tonumber(os.getenv("BENCH_THREADS") or "1")
  pos = id + 1
  prefix = "POST " .. os.getenv("BENCH_PATH") .. " HTTP/1.1\r\nHost: " .. wrk.host .. ":"
    .. wrk.port .. "\r\nContent-Length: 0\r\nAuthorization: Bearer "
  suffix = "\r\n\r\n"
end

function request()
  local token = tokens[pos]
  pos = pos + stride
  if pos > count then
    pos = pos - count
  end
  return prefix .. token .. suffix
end
