-- The scope's state refilled to now, nothing written: {field, value, ...} of the hash, then "hold", its owner.
refill()
local out = {}
for k, v in pairs(st) do
  out[#out + 1] = k
  out[#out + 1] = num(v)
end
out[#out + 1] = 'hold'
out[#out + 1] = redis.call('HGET', holdkey, 'owner') or ''
return out
