-- KEYS: scope hash. ARGV: limit. The operator's limit wins over callers' configuration.
redis.call('HSET', KEYS[1], 'limit', ARGV[1], 'olimit', ARGV[1])
redis.call('HSETNX', KEYS[1], 'spent', '0')
redis.call('HSETNX', KEYS[1], 'reserved', '0')
redis.call('HSETNX', KEYS[1], 'ttl', '0')
return 1
