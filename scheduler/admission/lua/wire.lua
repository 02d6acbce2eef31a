-- BucketState.wire. ARGV[2] costs (JSON). Returns the cumulative counts sent, as {name, value, ...}.
local costs = cjson.decode(ARGV[2])
for name, v in pairs(costs) do st['s:' .. name] = (st['s:' .. name] or 0) + v end
save()
local out = {}
for k, v in pairs(st) do
  if string.sub(k, 1, 2) == 's:' then
    out[#out + 1] = string.sub(k, 3)
    out[#out + 1] = num(v)
  end
end
return out
