-- reserve_up_to: one call checks the kill switches, sweeps expired leases, and grants
-- g = min(maximum, smallest room) in every scope when g >= minimum, else nothing.
-- Room of a scope: min(stored limit, cap) - spent - reserved.
-- KEYS: pause set, lease record, then (scope hash, scope lease zset) per scope.
-- ARGV: lease, '<minimum>:<maximum>',
--       '<lease ms>:<clock offset ms>:<record ttl ms>:<sweep max>:<want usage>',
--       scope keys json, number of pause keys, pause keys..., then one spec per scope.
-- (Few arguments: packing them is most of the client's CPU time per call.)
-- Returns {'dup', swept, granted} | {'paused', swept, key} |
--   {'denied', swept, index, stored limit, spent, reserved} (the first scope that refuses) |
--   {'ok', swept, pauses or '', granted, then limit spent reserved per scope if wanted}
--   (the amounts of 'ok' as integers while exact: see reply_amount).
local lease_ms, offset, record_ms, sweep, want =
  string.match(ARGV[3], '^(%d+):(-?%d+):(%d+):(%d+):([01])$')
lease_ms = tonumber(lease_ms)
sweep = tonumber(sweep)
local now = now_ms(offset)
local n = (#KEYS - 2) / 2
local swept = 0
for i = 1, n do
  local h, z = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local due = redis.call('ZRANGEBYSCORE', z, '-inf', string.format('%d', now), 'LIMIT', 0, sweep)
  if #due > 0 then
    local live = redis.call('EXISTS', h) == 1
    for _, m in ipairs(due) do
      local a = string.match(m, '|(%d+)$')
      if live and a then incr(h, 'reserved', a, '-') end
      redis.call('ZREM', z, m)
      swept = swept + 1
    end
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'dup', swept, redis.call('HGET', KEYS[2], 'a') or '0'}
end
local np = tonumber(ARGV[5])
local switches = redis.call('SCARD', KEYS[1])  -- (read once: the reply lists them too)
if np > 0 and switches > 0 then
  for j = 6, 5 + np do
    if redis.call('SISMEMBER', KEYS[1], ARGV[j]) == 1 then return {'paused', swept, ARGV[j]} end
  end
end
local base = 5 + np
local minimum, maximum = string.match(ARGV[2], '^(%d+):(%d+)$')
minimum = tonumber(minimum)
local usage = {}
local ttls = {}
local refused = 0
local least = tonumber(maximum)
for i = 1, n do
  local lim, lower, ttl, cap = spec(ARGV[base + i])
  local limit, spent, reserved = resolve(KEYS[1 + 2 * i], lim, lower, ttl)
  usage[i] = {limit, spent, reserved}
  ttls[i] = tonumber(ttl)
  local eff = tonumber(limit)
  if cap ~= '' and tonumber(cap) < eff then eff = tonumber(cap) end
  local room = eff - tonumber(spent) - tonumber(reserved)
  if refused == 0 and room < minimum then refused = i end
  if room < least then least = room end
end
if refused > 0 then
  -- The first scope (in the caller's order) that refuses; every scope is resolved first.
  for j = 1, n do touch(KEYS[1 + 2 * j], ttls[j]) end
  local u = usage[refused]
  return {'denied', swept, refused, u[1], u[2], u[3]}
end
local grant = maximum
if least < tonumber(maximum) then grant = string.format('%d', least) end
local deadline = string.format('%d', now + lease_ms)
local member = ARGV[1] .. '|' .. grant
local out = {'ok', swept, '', reply_amount(grant)}
for i = 1, n do
  local h, z = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  incr(h, 'reserved', grant, '')
  redis.call('ZADD', z, deadline, member)
  local ttl = ttls[i]
  if ttl > 0 then
    local keep = math.max(ttl, lease_ms)
    touch(h, keep)
    touch(z, keep)
  end
  if want == '1' then
    local u = usage[i]
    out[#out + 1] = reply_amount(u[1])
    out[#out + 1] = reply_amount(u[2])
    out[#out + 1] = reply_amount(string.format('%d', tonumber(u[3]) + tonumber(grant)))
  end
end
redis.call('HSET', KEYS[2], 'a', grant, 'st', 'r', 'k', ARGV[4], 'dl', deadline)
redis.call('PEXPIRE', KEYS[2], record_ms)
if want == '1' and switches > 0 then
  out[3] = table.concat(redis.call('SMEMBERS', KEYS[1]), '\n')
end
return out
