-- search_geo: geo indexes around one or more centres, as one flat reply.
--
-- KEYS[i]  partition geo index  fs:{pNN}:geo (on a Redis Cluster, one key per call)
-- ARGV     lng1, lat1, radius_km1 [, lng2, lat2, radius_km2 ...]
--
-- Returns {member, lng, lat, member, lng, lat, ...}: every member within each radius of
-- its centre, unordered, coordinates as the index holds them (its 52-bit geohash cell's
-- centre); a member found from two centres appears twice.
local out = {}
local n = 0
for _, key in ipairs(KEYS) do
  for c = 1, #ARGV, 3 do
    local found = redis.call('GEOSEARCH', key, 'FROMLONLAT', ARGV[c], ARGV[c + 1],
      'BYRADIUS', ARGV[c + 2], 'km', 'WITHCOORD')
    for i = 1, #found do
      local row = found[i]
      out[n + 1] = row[1]
      out[n + 2] = row[2][1]
      out[n + 3] = row[2][2]
      n = n + 3
    end
  end
end
return out
