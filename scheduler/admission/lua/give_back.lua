-- BucketState.give_back. ARGV[2] amounts (JSON), ARGV[3] "1" to uncount them, ARGV[4] the buckets to empty
-- (JSON list), ARGV[5] the burst's shrink factor, ARGV[6] its floor.
local amounts = cjson.decode(ARGV[2])
local uncount = ARGV[3] == '1'
local empty = cjson.decode(ARGV[4])
local shrink = tonumber(ARGV[5])
local min_burst = tonumber(ARGV[6])
refill()
if shrink ~= 1 then
  burst = math.max(min_burst, burst * shrink)
  refill()
end
for _, d in ipairs(p.dims) do
  local amount = amounts[d] or 0
  if amount ~= 0 then st['l:' .. d] = math.min(cap(d), st['l:' .. d] + amount) end
end
if uncount then
  for name, v in pairs(amounts) do
    st['c:' .. name] = (st['c:' .. name] or 0) - v
    st['s:' .. name] = (st['s:' .. name] or 0) - v
  end
end
for _, d in ipairs(empty) do
  if st['l:' .. d] ~= nil then st['l:' .. d] = math.min(st['l:' .. d], 0) end
end
save()
return 1
