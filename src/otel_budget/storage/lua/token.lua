-- A call token (RedisStorage.put_token / take_token). KEYS[1]: the token's key.
-- ARGV[1] "put": hold it for ARGV[2] ms (again: the TTL starts over); returns 1.
-- ARGV[1] "take": delete it; 1 if it was there (the one taker), else 0. Redis expires it.
if ARGV[1] == 'put' then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
  return 1
end
return redis.call('DEL', KEYS[1])
