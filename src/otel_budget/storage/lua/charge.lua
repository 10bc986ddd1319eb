-- Spend without a reservation; never refused.
-- KEYS: lease record, then one scope hash per scope.
-- ARGV: lease, amount, settled ttl ms, then one spec per scope (its cap is not used).
if redis.call('EXISTS', KEYS[1]) == 1 then return {'dup'} end
local out = {'ok'}
for i = 2, #KEYS do
  local h = KEYS[i]
  local lim, lower, ttl = spec(ARGV[2 + i])
  resolve(h, lim, lower, ttl)
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
