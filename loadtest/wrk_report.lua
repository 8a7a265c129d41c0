-- Shared by the wrk scripts of loadtest.bench (loaded with dofile from env BENCH_REPORT):
-- counts responses by status in each thread and, at the end, prints
-- "status <code> <count>" per status and the p50/p99 latency in microseconds.
threads = {}
statuses = {}

function register(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, n in pairs(s) do
      total[code] = (total[code] or 0) + n
    end
  end
  for code, n in pairs(total) do
    io.write(string.format("status %d %d\n", code, n))
  end
  io.write(string.format("latency_p50_us %d\nlatency_p99_us %d\n",
    latency:percentile(50), latency:percentile(99)))
end
