-- Cluster ledger (redis_cluster.py): lower one slot group's open reservation of a lease to
-- the call's final grant, when a later group granted less; or (ARGV[3] = '1', a later
-- group refused) take it back and forget the record, so that the lease never reserved here.
-- KEYS: the group's lease record, scope hash, scope lease zset. ARGV: lease, amount, drop.
-- Returns 1 if changed, 0 if the lease is not open here (or already at most that amount).
if redis.call('HGET', KEYS[1], 'st') ~= 'r' then return 0 end
local a = redis.call('HGET', KEYS[1], 'a')
local drop = ARGV[3] == '1'
if not drop and tonumber(ARGV[2]) >= tonumber(a) then return 0 end
local deadline = redis.call('ZSCORE', KEYS[3], ARGV[1] .. '|' .. a)
if drop then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'a', ARGV[2])
end
if not deadline then return 1 end -- swept (expired) or reset: nothing is held any more
redis.call('ZREM', KEYS[3], ARGV[1] .. '|' .. a)
local keep = drop and '0' or ARGV[2]
if not drop then redis.call('ZADD', KEYS[3], deadline, ARGV[1] .. '|' .. keep) end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'reserved', string.format('%d', tonumber(keep) - tonumber(a)))
end
return 1
