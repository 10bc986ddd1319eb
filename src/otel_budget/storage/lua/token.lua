-- A call token (RedisStorage.put_token / take_token). KEYS[1]: the token's key.
-- ARGV[1] "put": hold the amount ARGV[3] for ARGV[2] ms (put again: replaced); returns 1.
-- ARGV[1] "take": the amount, deleted in the same step (the one taker), or false (nil).
if ARGV[1] == 'put' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 1
end
local amount = redis.call('GET', KEYS[1])
if amount then
  redis.call('DEL', KEYS[1])
end
return amount
