-- One lease's settle (settle_one.lua, prepended).
-- KEYS: lease record, then (scope hash, scope lease zset) per scope.
-- ARGV: lease, mode ('c' commit, 'r' release, 't' release leaving a tombstone), actual,
--       settled ttl ms.
return settle_one(KEYS, 1, #KEYS, ARGV[1], ARGV[2], ARGV[3], ARGV[4])
