-- reset (spent and reserved to 0, keep the limit) or delete a scope: an operator decision.
-- Commits of leases open at the time still count (their zset member is gone: late spend).
-- KEYS: scope hash, scope lease zset. ARGV: 'reset' | 'delete'. Returns 1 if it existed.
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
  return 0
end
if ARGV[1] == 'delete' then
  redis.call('DEL', KEYS[1], KEYS[2])
else
  redis.call('HSET', KEYS[1], 'spent', '0', 'reserved', '0')
  redis.call('DEL', KEYS[2])
end
return 1
