-- BucketState.acquire. ARGV[2] costs (JSON), ARGV[3] the floor share, ARGV[4] owner, ARGV[5] "1" to claim
-- when refused, ARGV[6] the claim's grace in seconds. Returns {wait, binding dimension or ""}.
refill()
local costs = cjson.decode(ARGV[2])
local floor = tonumber(ARGV[3])
local owner = ARGV[4]
local claim = ARGV[5] == '1'
local grace = tonumber(ARGV[6])
local hold = nil
local h = redis.call('HGETALL', holdkey)
if #h > 0 then
  hold = {needs = {}}
  for i = 1, #h, 2 do
    local name, value = h[i], h[i + 1]
    if name == 'owner' then hold.owner = value
    elseif name == 'expires' then hold.expires = tonumber(value)
    else hold.needs[string.sub(name, 3)] = tonumber(value) end
  end
  if hold.expires <= now then
    redis.call('DEL', holdkey)
    hold = nil
  end
end
local other = hold ~= nil and hold.owner ~= owner
local wait, binding = 0, ''
local needs = {}
for _, d in ipairs(p.dims) do
  local c = cap(d)
  local need = math.min(costs[d] or 0, c * (1 - floor)) + c * floor
  needs[d] = need
  if other then need = need + (hold.needs[d] or 0) end
  local level = st['l:' .. d]
  if level < need - 1e-9 then
    local w = (need - level) / rate(d)
    if w > wait then
      wait, binding = w, d
    end
  end
end
if wait > 0 then
  if claim and not other then
    local own = 0
    for _, d in ipairs(p.dims) do
      local w = (needs[d] - st['l:' .. d]) / rate(d)
      if w > own then own = w end
    end
    local expires = now + own + grace
    redis.call('DEL', holdkey)
    local out = {'owner', owner, 'expires', num(expires)}
    for _, d in ipairs(p.dims) do
      out[#out + 1] = 'n:' .. d
      out[#out + 1] = num(needs[d])
    end
    redis.call('HSET', holdkey, unpack(out))
    redis.call('PEXPIRE', holdkey, math.ceil((own + grace) * 1000) + 1)
  end
  save()
  return {num(wait), binding}
end
for _, d in ipairs(p.dims) do st['l:' .. d] = st['l:' .. d] - (costs[d] or 0) end
for name, v in pairs(costs) do st['c:' .. name] = (st['c:' .. name] or 0) + v end
if hold ~= nil and hold.owner == owner then redis.call('DEL', holdkey) end
save()
return {'0', ''}
