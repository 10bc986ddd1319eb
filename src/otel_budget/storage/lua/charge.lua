-- Spend without a reservation (a call let through under fail_open, or seen only at its end);
-- never refused. Idempotent by lease: a lease already committed, released or charged is
-- 'dup'. A tombstone ('t': a reserve of this lease timed out and was cancelled) is not a
-- settlement: the call went ahead unmetered, so its charge counts. A ghost reservation of
-- the same lease ('r': the timed-out reserve ran after all) is settled by this charge.
-- KEYS: lease record, then (scope hash, scope lease zset) per scope.
-- ARGV: lease, amount, settled ttl ms, then one spec per scope (its cap is not used).
local st = redis.call('HGET', KEYS[1], 'st')
if st and st ~= 't' and st ~= 'r' then return {'dup'} end
local a = st == 'r' and redis.call('HGET', KEYS[1], 'a') or nil
local out = {'ok'}
local n = (#KEYS - 1) / 2
for i = 1, n do
  local h, z = KEYS[2 * i], KEYS[2 * i + 1]
  local lim, lower, ttl = spec(ARGV[3 + i])
  resolve(h, lim, lower, ttl)
  if a and redis.call('ZREM', z, ARGV[1] .. '|' .. a) == 1 then incr(h, 'reserved', a, '-') end
  add_spent(h, ARGV[2])
  touch(h, tonumber(ttl))
  local u = redis.call('HMGET', h, 'limit', 'spent', 'reserved')
  out[#out + 1] = u[1]
  out[#out + 1] = u[2]
  out[#out + 1] = u[3]
end
redis.call('HSET', KEYS[1], 'st', 'g')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return out
