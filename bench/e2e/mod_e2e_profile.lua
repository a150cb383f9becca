-- mod_e2e_profile: a Lua-level sampling profiler for bench/e2e.lua --profile PHASE.
-- Not for production. SIGUSR1 starts sampling (a count hook every E2E_PROFILE_PERIOD Lua VM
-- instructions, on the main thread and every coroutine), SIGUSR2 stops and writes the
-- samples as folded stacks ("root;...;leaf count") to E2E_PROFILE_OUT. The count is in VM
-- instructions, so time spent inside C functions (sqlite, expat, syscalls) is not seen:
-- use perf for that (bench/e2e.lua --perf PHASE).
module:set_global()

local out = os.getenv("E2E_PROFILE_OUT") or "/tmp/e2e-profile.folded"
local period = tonumber(os.getenv("E2E_PROFILE_PERIOD") or "") or 1000
local getinfo, sethook, concat = debug.getinfo, debug.sethook, table.concat

local threads = setmetatable({}, { __mode = "k" })
local samples = {}
local active = false

local function frame(info)
	if info.what == "C" then return "[C] " .. (info.name or "?") end
	local src = info.short_src:gsub("^.*/", "")
	return ("%s:%d %s"):format(src, info.linedefined, info.name or "?")
end

local random = math.random
local hook
-- A random period (mean `period`), so that samples do not alias with the fixed
-- instruction count of a per-stanza code path.
local function rearm() sethook(hook, "", random(period // 2, period * 3 // 2)) end

function hook()
	rearm()
	local parts, n = {}, 0
	local level = 2
	while true do
		local info = getinfo(level, "Sn")
		if not info then break end
		n = n + 1
		parts[n] = frame(info)
		level = level + 1
		if n >= 60 then break end
	end
	-- root first
	for i = 1, n // 2 do parts[i], parts[n - i + 1] = parts[n - i + 1], parts[i] end
	local key = concat(parts, ";")
	samples[key] = (samples[key] or 0) + 1
end

local cocreate, cowrap = coroutine.create, coroutine.wrap
coroutine.create = function(f)
	local co = cocreate(f)
	threads[co] = true
	if active then sethook(co, hook, "", period) end
	return co
end
coroutine.wrap = function(f)
	local co = cocreate(f)
	threads[co] = true
	if active then sethook(co, hook, "", period) end
	return function(...)
		local r = table.pack(coroutine.resume(co, ...))
		if not r[1] then error(r[2], 0) end
		return table.unpack(r, 2, r.n)
	end
end

-- Under bench/e2e.lua --callgrind: E2E_CALLGRIND names the built bench/e2e/cg.c.
local cg
if os.getenv("E2E_CALLGRIND") then
	cg = assert(package.loadlib(os.getenv("E2E_CALLGRIND"), "luaopen_e2e_cg"))()
end
local sampling = os.getenv("E2E_PROFILE_OUT") ~= nil and not cg

module:hook_global("signal/SIGUSR1", function()
	if cg then
		cg.start()
		module:log("info", "callgrind instrumentation on")
		return
	end
	if not sampling then return end
	samples, active = {}, true
	rearm()
	for co in pairs(threads) do
		if coroutine.status(co) ~= "dead" then sethook(co, hook, "", period) end
	end
	module:log("info", "profiling started, period %d", period)
end)

module:hook_global("signal/SIGUSR2", function()
	if cg then
		cg.stop(os.getenv("E2E_CALLGRIND_PHASE") or "phase")
		module:log("info", "callgrind instrumentation off, stats dumped")
		return
	end
	if not sampling then return end
	active = false
	sethook()
	for co in pairs(threads) do
		if coroutine.status(co) ~= "dead" then sethook(co) end
	end
	local f = assert(io.open(out .. ".tmp", "w"))
	for k, v in pairs(samples) do f:write(k, " ", v, "\n") end
	f:close()
	os.rename(out .. ".tmp", out)
	module:log("info", "profile written to %s", out)
end)
