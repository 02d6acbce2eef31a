-- The state of one limit scope and what every transition needs: the model's parameters (ARGV[1], JSON), the
-- time, the rates and caps. It mirrors scheduler/admission/buckets.py (BucketState.rate, cap, refill); the
-- transition scripts that follow it mirror the methods of the same names. KEYS[1] is the scope's hash,
-- KEYS[2] its hold.
local key, holdkey = KEYS[1], KEYS[2]
local p = cjson.decode(ARGV[1])
local now = tonumber(p.now)
if now == nil then
  -- Redis' own clock: every process on every host shares one timeline.
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local st = {}
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do st[fields[i]] = tonumber(fields[i + 1]) end
local burst = st['bf'] or 1

local function rate(d)
  local r = p.rates[d]
  local learned = st['m:' .. d]
  if learned ~= nil and learned / 60 < r then r = learned / 60 end
  return r
end

local function cap(d)
  return math.max(1, rate(d) * p.burst_s * (1 - p.keep) * burst)
end

-- A new bucket's level: fill of its cap, and at least one unit.
local function start(d)
  local c = cap(d)
  return math.max(c * (p.fill[d] or 1), math.min(c, 1))
end

local function refill()
  local ts = st['ts']
  if ts == nil then
    for _, d in ipairs(p.dims) do st['l:' .. d] = start(d) end
    st['ts'] = now
    return
  end
  local elapsed = now - ts
  for _, d in ipairs(p.dims) do
    local level = st['l:' .. d]
    local c = cap(d)
    if level == nil then
      st['l:' .. d] = start(d)
    elseif elapsed > 0 then
      st['l:' .. d] = math.min(c, level + elapsed * rate(d))
    else
      st['l:' .. d] = math.min(c, level)
    end
  end
  if elapsed > 0 then st['ts'] = now end
end

local function num(x)
  return string.format('%.17g', x)
end

local function save()
  st['bf'] = burst
  local out = {}
  for k, v in pairs(st) do
    out[#out + 1] = k
    out[#out + 1] = num(v)
  end
  redis.call('HSET', key, unpack(out))
  redis.call('PEXPIRE', key, p.ttl_ms)
end
