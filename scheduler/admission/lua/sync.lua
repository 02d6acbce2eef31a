-- BucketState.sync. ARGV[2] bounds, ARGV[3] marks, ARGV[4] learned limits (JSON), ARGV[5] the widening step.
local bounds = cjson.decode(ARGV[2])
local marks = cjson.decode(ARGV[3])
local learned = cjson.decode(ARGV[4])
local widen = tonumber(ARGV[5])
for d, v in pairs(learned) do
  if v > 0 and v < (st['m:' .. d] or math.huge) then st['m:' .. d] = v end
end
refill()
for d, bound in pairs(bounds) do
  if st['l:' .. d] ~= nil then
    local after = (st['s:' .. d] or 0) - (marks[d] or 0)
    st['l:' .. d] = math.min(st['l:' .. d], bound - after)
  end
end
if burst < 1 and widen > 0 then
  burst = math.min(1, burst + widen)
  refill()
end
save()
return 1
