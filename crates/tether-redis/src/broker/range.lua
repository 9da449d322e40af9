-- Tether: a channel's head and part of its history, read together (docs/cluster.md).
-- KEYS: 1 meta, 2 stream.
-- ARGV: 1 epoch the caller knows ('' none), 2 first offset wanted when that is the
--       channel's epoch, 3 last offset wanted (0: up to the head), 4 at most this
--       many messages (0: the head only), 5 an epoch to start the channel at
--       (offset 0) if it has none ('' to leave it without), 6 the meta's TTL (ms).
-- Returns {} for a channel with no history, else {epoch, last offset, then per
-- message: offset, id, published at (ms), data}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  if ARGV[5] == '' then return {} end
  epoch = ARGV[5]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
local out = {epoch, redis.call('HGET', KEYS[1], 'offset')}
if tonumber(ARGV[4]) == 0 then return out end
local first = '-'
if ARGV[1] == epoch then first = ARGV[2] .. '-0' end
local last = '+'
if tonumber(ARGV[3]) > 0 then last = ARGV[3] .. '-0' end
for _, e in ipairs(redis.call('XRANGE', KEYS[2], first, last, 'COUNT', ARGV[4])) do
  local f = e[2]
  out[#out + 1] = string.match(e[1], '^(%d+)')
  out[#out + 1] = f[2]
  out[#out + 1] = f[4]
  out[#out + 1] = f[6]
end
return out
