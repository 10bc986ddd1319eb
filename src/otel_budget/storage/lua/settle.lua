-- commit / release / release leaving a tombstone (a reserve whose outcome is unknown).
-- KEYS: lease record, then (scope hash, scope lease zset) per scope.
-- ARGV: lease, mode ('c' commit, 'r' release, 't' release leaving a tombstone), actual,
--       settled ttl ms.
-- A lease with no record: 'none' (its record is gone: a Redis restart without persistence,
-- or it expired; the caller may charge the spend instead), after leaving a tombstone in
-- mode 't'. A tombstone release of a ghost reservation leaves state 't' too (a tombstone,
-- not a settlement: the call's later charge still counts).
-- Returns 'dup', 'none', or one string: status, amount, then index limit spent reserved per scope
-- that still exists (one string: parsing a long reply array costs the client more).
local st = redis.call('HGET', KEYS[1], 'st')
if not st then
  if ARGV[2] == 't' then
    redis.call('HSET', KEYS[1], 'st', 't')
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    return 'dup'
  end
  return 'none'
end
if st ~= 'r' then return 'dup' end
local a = redis.call('HGET', KEYS[1], 'a')
local member = ARGV[1] .. '|' .. a
local commit = ARGV[2] == 'c'
local n = (#KEYS - 1) / 2
local held, late = 0, 0
local out = {'', a}
for i = 1, n do
  local h, z = KEYS[2 * i], KEYS[2 * i + 1]
  local removed = redis.call('ZREM', z, member)
  if redis.call('EXISTS', h) == 1 then
    if removed == 1 then
      held = held + 1
      incr(h, 'reserved', a, '-')
    else
      late = late + 1
    end
    if commit then add_spent(h, ARGV[3]) end
    local u = redis.call('HMGET', h, 'limit', 'spent', 'reserved', 'ttl')
    if u[4] then touch(h, tonumber(u[4])) end
    out[#out + 1] = i
    out[#out + 1] = u[1]
    out[#out + 1] = u[2]
    out[#out + 1] = u[3]
  end
end
if commit then
  out[1] = late > 0 and 'late' or 'ok'
  redis.call('HSET', KEYS[1], 'st', 'c')
else
  out[1] = (held == 0 and late > 0) and 'dup' or 'released'
  redis.call('HSET', KEYS[1], 'st', ARGV[2] == 't' and 't' or 'x')
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return table.concat(out, ' ')
