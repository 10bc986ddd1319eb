-- Prepended (after helpers.lua) to settle.lua and settle_many.lua: one lease's settle.
-- commit / release / release leaving a tombstone (a reserve whose outcome is unknown).
-- K[k]: the lease record, then (scope hash, scope lease zset) per scope, n keys in all.
-- lease, mode ('c' commit, 'r' release, 't' release leaving a tombstone), actual, settled
-- ttl ms.
-- A lease with no record: 'none' (its record is gone: a Redis restart without persistence,
-- or it expired; the caller may charge the spend instead), after leaving a tombstone in
-- mode 't'. A tombstone release of a ghost reservation leaves state 't' too (a tombstone,
-- not a settlement: the call's later charge still counts).
-- Returns 'dup', 'none', or one string: status, amount, then index limit spent reserved per scope
-- that still exists (one string: parsing a long reply array costs the client more).
local function settle_one(K, k, n, lease, mode, actual, settled_ms)
  local rec = K[k]
  local st = redis.call('HGET', rec, 'st')
  if not st then
    if mode == 't' then
      redis.call('HSET', rec, 'st', 't')
      redis.call('PEXPIRE', rec, settled_ms)
      return 'dup'
    end
    return 'none'
  end
  if st ~= 'r' then return 'dup' end
  local a = redis.call('HGET', rec, 'a')
  local member = lease .. '|' .. a
  local commit = mode == 'c'
  local scopes = (n - 1) / 2
  local held, late = 0, 0
  local out = {'', a}
  for i = 1, scopes do
    local h, z = K[k + 2 * i - 1], K[k + 2 * i]
    local removed = redis.call('ZREM', z, member)
    if redis.call('EXISTS', h) == 1 then
      if removed == 1 then
        held = held + 1
        incr(h, 'reserved', a, '-')
      else
        late = late + 1
      end
      if commit then add_spent(h, actual) end
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
    redis.call('HSET', rec, 'st', 'c')
  else
    out[1] = (held == 0 and late > 0) and 'dup' or 'released'
    redis.call('HSET', rec, 'st', mode == 't' and 't' or 'x')
  end
  redis.call('PEXPIRE', rec, settled_ms)
  return table.concat(out, ' ')
end
