-- KEYS: scope hash, scope lease zset. A scope with open reservations stays.
local r = redis.call('HGET', KEYS[1], 'reserved')
if r and r ~= '0' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
