-- Summarises a folded profile from bench/e2e.lua --profile: top functions by self and by
-- inclusive samples.   lua5.4 bench/e2e/fold.lua FILE [TOP]
local file, top = arg[1], tonumber(arg[2] or "") or 30
local self_c, incl, total = {}, {}, 0
for line in io.lines(file) do
	local stack, n = line:match("^(.*) (%d+)$")
	n = tonumber(n)
	total = total + n
	local frames, seen = {}, {}
	for f in (stack .. ";"):gmatch("(.-);") do frames[#frames + 1] = f end
	local leaf = frames[#frames]
	self_c[leaf] = (self_c[leaf] or 0) + n
	for _, f in ipairs(frames) do
		if not seen[f] then seen[f] = true; incl[f] = (incl[f] or 0) + n end
	end
end
local function show(title, t)
	local list = {}
	for k, v in pairs(t) do list[#list + 1] = { k, v } end
	table.sort(list, function(a, b) return a[2] > b[2] end)
	print(("%s (of %d samples)"):format(title, total))
	for i = 1, math.min(top, #list) do
		print(("  %6.1f%%  %s"):format(100 * list[i][2] / total, list[i][1]))
	end
end
show("self", self_c)
show("inclusive", incl)
