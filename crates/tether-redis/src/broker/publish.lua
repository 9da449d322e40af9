-- Tether: publish one message to a channel, atomically (docs/cluster.md).
-- KEYS: 1 meta (hash: epoch, offset), 2 stream (history), 3 idempotency key,
--       4 subscriber counts (hash: node -> subscribers there).
-- ARGV: 1 data (JSON, one line), 2 history.size, 3 history.ttl_ms, 4 meta TTL ms,
--       5 epoch for a history that starts now, 6 message id, 7 pub/sub channel,
--       8 '1' when KEYS[3] is a real idempotency key, 9 '1' to SPUBLISH.
-- Returns {duplicate 0|1, "<epoch>:<offset> <id>", subscribers}.
local function subscribers()
  local n = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[4])) do n = n + tonumber(v) end
  return n
end
if ARGV[8] == '1' then
  local first = redis.call('GET', KEYS[3])
  if first then return {1, first, subscribers()} end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  -- No meta: this channel's history is new or was lost. A new epoch, offset 0.
  epoch = ARGV[5]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local now = redis.call('TIME')
local ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0',
  'i', ARGV[6], 't', ms, 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local result = epoch .. ':' .. offset .. ' ' .. ARGV[6]
if ARGV[8] == '1' then redis.call('SET', KEYS[3], result, 'PX', ARGV[3]) end
local payload = epoch .. '\n' .. offset .. '\n' .. ARGV[6] .. '\n' .. ms .. '\n' .. ARGV[1]
if ARGV[9] == '1' then
  redis.call('SPUBLISH', ARGV[7], payload)
else
  redis.call('PUBLISH', ARGV[7], payload)
end
return {0, result, subscribers()}
