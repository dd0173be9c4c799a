"""The Lua scripts that change owner records, storage totals and reservations (see ownership.py
for the keys). Each runs atomically in the store, on the store's clock, through `store.script`.

Records are "tenant|size_bytes|expires_at (epoch s, 0: none)|recorded (ms)"; tenant names cannot
hold "|" (config.py), so the patterns below split them unambiguously.
"""

from __future__ import annotations

# Drops the records named in `ids` (if recorded before `before_ms`; 0: whatever their age) and
# takes them off their tenants' totals. Returns file_id, tenant, size for each record dropped.
_DROP = """
local function drop(ids, before_ms, out)
    for _, id in ipairs(ids) do
        local record = redis.call('HGET', KEYS[1], id)
        if record then
            local tenant, size, _, recorded = string.match(record, '^(.*)|(%d+)|(%d+)|(%d+)$')
            if before_ms == 0 or tonumber(recorded) < before_ms then
                redis.call('HDEL', KEYS[1], id)
                redis.call('ZREM', KEYS[3], id)
                redis.call('HINCRBY', KEYS[2], tenant .. '|files', -1)
                redis.call('HINCRBY', KEYS[2], tenant .. '|bytes', -tonumber(size))
                table.insert(out, id)
                table.insert(out, tenant)
                table.insert(out, size)
            end
        end
    end
    return out
end
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- At most 1000 due expiries per call: bounded work, the rest goes at the next call.
local function expire_due()
    local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', math.floor(now_ms() / 1000), 'LIMIT', 0, 1000)
    drop(due, 0, {})
end
"""

# KEYS own, storage, expiry, resv. ARGV tenant, bytes (-1: unknown, reserve what the quota leaves),
# quota_bytes, max_files (-1: none), id, ttl_ms. Returns {admitted (0/1), files used, bytes used,
# bytes reserved}, reservations of uploads under way counted as used.
RESERVE = (
    _DROP
    + """
expire_due()
local now = now_ms()
local tenant, add = ARGV[1], tonumber(ARGV[2])
local held_bytes, held_files = 0, 0
local reservations = redis.call('HGETALL', KEYS[4])
for i = 1, #reservations, 2 do
    local owner, size, deadline = string.match(reservations[i + 1], '^(.*)|(%d+)|(%d+)$')
    if tonumber(deadline) <= now then
        redis.call('HDEL', KEYS[4], reservations[i])
    elseif owner == tenant then
        held_bytes = held_bytes + tonumber(size)
        held_files = held_files + 1
    end
end
local files = tonumber(redis.call('HGET', KEYS[2], tenant .. '|files') or '0') + held_files
local bytes = tonumber(redis.call('HGET', KEYS[2], tenant .. '|bytes') or '0') + held_bytes
local quota, max_files = tonumber(ARGV[3]), tonumber(ARGV[4])
if add < 0 then add = math.max(0, quota - bytes) end
if (quota >= 0 and bytes + add > quota) or (max_files >= 0 and files + 1 > max_files) then
    return {0, files, bytes, add}
end
redis.call('HSET', KEYS[4], ARGV[5], tenant .. '|' .. add .. '|' .. (now + tonumber(ARGV[6])))
return {1, files, bytes, add}
"""
)

# KEYS own, storage, expiry, resv. ARGV reservation id ('' for none), file_id, tenant, size, expires_at.
# Records the owner unless the file has one already. Returns the owner now recorded.
SETTLE = (
    _DROP
    + """
if ARGV[1] ~= '' then redis.call('HDEL', KEYS[4], ARGV[1]) end
local record = redis.call('HGET', KEYS[1], ARGV[2])
if record then return string.match(record, '^(.*)|%d+|%d+|%d+$') end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. now_ms())
redis.call('HINCRBY', KEYS[2], ARGV[3] .. '|files', 1)
redis.call('HINCRBY', KEYS[2], ARGV[3] .. '|bytes', tonumber(ARGV[4]))
if tonumber(ARGV[5]) > 0 then redis.call('ZADD', KEYS[3], tonumber(ARGV[5]), ARGV[2]) end
return ARGV[3]
"""
)

# KEYS own, storage, expiry. ARGV before_ms, file ids... Returns what `drop` returns.
FORGET = (
    _DROP
    + """
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
return drop(ids, tonumber(ARGV[1]), {})
"""
)

# KEYS own, storage, expiry. Applies due expiries; returns the storage hash and the server's time (ms).
READ = (
    _DROP
    + """
expire_due()
return {redis.call('HGETALL', KEYS[2]), now_ms()}
"""
)

RELEASE = "return redis.call('HDEL', KEYS[1], ARGV[1])"


TIME = "local t = redis.call('TIME') return t[1] * 1000 + math.floor(t[2] / 1000)"
# Sets each tenant's totals from its records, so any drift is repaired. KEYS own, storage.
RECOUNT = """
local totals = {}
local records = redis.call('HGETALL', KEYS[1])
for i = 2, #records, 2 do
    local tenant, size = string.match(records[i], '^(.*)|(%d+)|%d+|%d+$')
    local files, bytes = totals[tenant] and totals[tenant][1] or 0, totals[tenant] and totals[tenant][2] or 0
    totals[tenant] = {files + 1, bytes + tonumber(size)}
end
redis.call('DEL', KEYS[2])
for tenant, counts in pairs(totals) do
    redis.call('HSET', KEYS[2], tenant .. '|files', counts[1], tenant .. '|bytes', counts[2])
end
return 1
"""
# KEYS own, storage, expiry. ARGV tenant, now (ms), then id, size, expires_at per file. Records the
# tenant as owner of each file without one; returns the owner of each file after the call.
ADOPT = """
local owners = {}
for i = 3, #ARGV, 3 do
    local id, size, expires = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local record = redis.call('HGET', KEYS[1], id)
    if record then
        owners[#owners + 1] = string.match(record, '^(.*)|%d+|%d+|%d+$')
    else
        redis.call('HSET', KEYS[1], id, ARGV[1] .. '|' .. size .. '|' .. expires .. '|' .. ARGV[2])
        redis.call('HINCRBY', KEYS[2], ARGV[1] .. '|files', 1)
        redis.call('HINCRBY', KEYS[2], ARGV[1] .. '|bytes', tonumber(size))
        if tonumber(expires) > 0 then redis.call('ZADD', KEYS[3], tonumber(expires), id) end
        owners[#owners + 1] = ARGV[1]
    end
end
return owners
"""
