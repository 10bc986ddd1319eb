-- A batch of settles in one script call (the queued writer's batches): the same
-- settle_one (prepended) per lease, in order; one reply string per lease, as settle.lua's.
-- KEYS: per lease, its record then (scope hash, scope lease zset) per scope.
-- ARGV: settled ttl ms, then per lease: lease, mode, actual, its number of keys.
local replies = {}
local k = 1
for j = 2, #ARGV, 4 do
  local n = tonumber(ARGV[j + 3])
  replies[#replies + 1] = settle_one(KEYS, k, n, ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[1])
  k = k + n
end
return replies
