-- wrk script for loadtest.bench: GET requests, discovery at random points, or a fixed path.
--
-- env BENCH_PATH     a fixed path (e.g. /healthz); if unset, discovery:
-- env BENCH_CENTER   "lat,lng"; points are drawn uniformly within BENCH_SPREAD degrees
-- env BENCH_SPREAD   degrees around the centre (default 0.1)
-- env BENCH_RADIUS   radius_km of each discovery request (default 2)
-- Prints "status <code> <count>" per response status at the end.
dofile(os.getenv("BENCH_REPORT"))  -- threads, statuses, response(), done()

function setup(thread)
  register(thread)
end

local fixed, lat0, lng0, spread, radius

function init(args)
  fixed = os.getenv("BENCH_PATH")
  local center = os.getenv("BENCH_CENTER") or "12.9716,77.5946"
  lat0, lng0 = center:match("([^,]+),([^,]+)")
  lat0, lng0 = tonumber(lat0), tonumber(lng0)
  spread = tonumber(os.getenv("BENCH_SPREAD") or "0.1")
  radius = os.getenv("BENCH_RADIUS") or "2"
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0) % 100000)
end

function request()
  if fixed then
    return wrk.format("GET", fixed)
  end
  local lat = lat0 + (math.random() * 2 - 1) * spread
  local lng = lng0 + (math.random() * 2 - 1) * spread
  return wrk.format("GET", string.format("/v1/deals?lat=%.5f&lng=%.5f&radius_km=%s&limit=20",
    lat, lng, radius))
end
