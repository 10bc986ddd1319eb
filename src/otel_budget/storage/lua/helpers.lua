-- Prepended to reserve.lua, settle.lua and charge.lua when they are loaded.
-- Rules for every script (checked by a test): locals only (a global poisons fakeredis and
-- errors on Redis), no os or bit library (absent from Redis' Lua), no shebang flags
-- (fakeredis cannot load them), amounts written only from ARGV strings or integer formats
-- (never a formatted float).
local function now_ms(offset)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(offset)
end
-- Refresh a TTL on use; skip the write while it is within 1/64 of the target already.
local function touch(k, ms)
  if ms > 0 and redis.call('PTTL', k) < ms - math.floor(ms / 64) then
    redis.call('PEXPIRE', k, string.format('%d', ms))
  end
end
local function incr(h, field, amount, sign)
  if amount ~= '0' then redis.call('HINCRBY', h, field, sign .. amount) end
end
-- Spend saturates far below HINCRBY's 2**63 overflow: a commit never fails.
local function add_spent(h, amount)
  if amount ~= '0' then
    local v = redis.call('HINCRBY', h, 'spent', amount)
    if tonumber(v) > 4000000000000000000 then
      redis.call('HSET', h, 'spent', '4000000000000000000')
    end
  end
end
-- An amount as a reply: an integer (the client reads it without decoding a string) while a
-- double holds it exactly, else its text (a value above 2**53: an override written into
-- Redis by hand, a saturated spend).
local function reply_amount(text)
  local n = tonumber(text)
  if n and n < 9007199254740992 then return n end
  return text
end
-- A scope's spec, one ARGV: '<limit>:<lower_only 0|1>:<ttl ms, 0: none>:<cap, '': none>'.
local function spec(text)
  return string.match(text, '^(%d+):([01]):(%d+):(%d*)$')
end
-- Find or create a scope and apply the caller's limit: trace scopes only go down, named
-- scopes follow the caller unless an operator override ('olimit') is stored. A cap is
-- never stored here.
local function resolve(h, lim, lower, ttl)
  local cur = redis.call('HMGET', h, 'limit', 'spent', 'reserved', 'olimit')
  local limit, spent, reserved = cur[1], cur[2] or '0', cur[3] or '0'
  if not limit then
    limit = cur[4] or lim
    redis.call('HSET', h, 'limit', limit, 'spent', spent, 'reserved', reserved, 'ttl', ttl)
  elseif lower == '1' then
    if tonumber(lim) < tonumber(limit) then
      limit = lim
      redis.call('HSET', h, 'limit', limit)
    end
  else
    local want = cur[4] or lim
    if want ~= limit then
      limit = want
      redis.call('HSET', h, 'limit', limit)
    end
  end
  return limit, spent, reserved
end
