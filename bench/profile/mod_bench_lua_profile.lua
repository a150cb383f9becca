-- Loaded by `bench/drain.lua --lua-profile PREFIX`: samples the Lua code the server runs, every
-- 500 to 1,500 VM instructions (a random count, so that loops do not alias with it), on the
-- main thread and every coroutine created after load. At shutdown it writes, to the file named
-- by the global option bench_lua_profile, the share of samples per function (self and
-- inclusive) and per line. Counts VM instructions, not time: work in C (the collector,
-- string building, sqlite) shows only as the Lua line that called it.
local out = module:get_option_string("bench_lua_profile", "lua_profile.txt")
local getinfo, sethook, running, random = debug.getinfo, debug.sethook, coroutine.running, math.random
local self_n, incl_n, line_n, total = {}, {}, {}, 0

local hook
function hook()
	sethook(running(), hook, "", random(500, 1500))
	local info = getinfo(2, "Sl")
	if not info then return end
	total = total + 1
	local fk = info.short_src .. ":" .. info.linedefined
	self_n[fk] = (self_n[fk] or 0) + 1
	local lk = info.short_src .. ":" .. (info.currentline or 0)
	line_n[lk] = (line_n[lk] or 0) + 1
	local seen = {}
	for level = 2, 60 do
		local f = getinfo(level, "S")
		if not f then break end
		local k = f.short_src .. ":" .. f.linedefined
		if not seen[k] then seen[k] = true; incl_n[k] = (incl_n[k] or 0) + 1 end
	end
end

sethook(hook, "", 1000)
local main = debug.getregistry()[1] -- (LUA_RIDX_MAINTHREAD)
if type(main) == "thread" then sethook(main, hook, "", 1000) end
local create = coroutine.create
coroutine.create = function(f) -- luacheck: ignore 122
	local co = create(f)
	sethook(co, hook, "", 1000)
	return co
end

module:hook_global("server-stopping", function()
	local f = assert(io.open(out, "w"))
	for _, t in ipairs { { self_n, "self" }, { incl_n, "inclusive" }, { line_n, "lines" } } do
		local counts, keys = t[1], {}
		for k in pairs(counts) do keys[#keys + 1] = k end
		table.sort(keys, function(a, b) return counts[a] > counts[b] end)
		f:write(("== %s (%d samples)\n"):format(t[2], total))
		for i = 1, math.min(60, #keys) do
			f:write(("%6.2f%%  %s\n"):format(100 * counts[keys[i]] / total, keys[i]))
		end
	end
	f:close()
end)
