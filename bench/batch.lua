-- bench/batch.lua: what the sqlite backend costs under the group commit, at the core:
-- N stores round-robin to R users in batches of B (db:begin ... db:commit, as the
-- plugin commits the messages of one event-loop turn), then one pop per user.
-- Prints CPU microseconds per message (user and system, from /proc/self/stat) for
-- each phase, medians over the repetitions, and the bytes on disk per message.
--
--   lua5.4 bench/batch.lua [-N 20000] [-R 200] [-B 90] [--reps 5]
--   OFFLINE_STORE_CPATH=/other/checkout/build/?.so lua5.4 bench/batch.lua ...
--                                       (the same against another build of the core)
--
-- The defaults are the end-to-end benchmark's load (bench/e2e.lua: 20,000 messages to
-- 200 users; its commits carry about 90 messages). -B 1 is a commit per message.
-- Run from the repository root.

package.cpath = (os.getenv("OFFLINE_STORE_CPATH") or "build/?.so") .. ";" .. package.cpath
local core = require "offline_store.core"

local N, R, B, REPS = 20000, 200, 90, 5
do
	local i = 1
	while arg[i] do
		local a, v = arg[i], tonumber(arg[i + 1] or "")
		if a == "-N" and v then N = v
		elseif a == "-R" and v then R = v
		elseif a == "-B" and v then B = v
		elseif a == "--reps" and v then REPS = v
		else io.stderr:write("usage: lua5.4 bench/batch.lua [-N n] [-R users] [-B batch] [--reps k]\n"); os.exit(2) end
		i = i + 2
	end
end

local TICK = 100 -- clock ticks per second in /proc/<pid>/stat (USER_HZ)
local function cpu()
	local f = assert(io.open("/proc/self/stat"))
	local stat = f:read("a")
	f:close()
	local fields = {}
	for x in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
	return tonumber(fields[12]) / TICK, tonumber(fields[13]) / TICK -- utime, stime
end

local function median(t)
	table.sort(t)
	local n = #t
	return n % 2 == 1 and t[(n + 1) // 2] or (t[n // 2] + t[n // 2 + 1]) / 2
end

local HOST, BODY = "localhost", ("x"):rep(100)

local function one_run(dir)
	local file = dir .. "/bench.sqlite"
	local db = assert(core.open_sqlite(file))
	local u0, s0 = cpu()
	local open = false
	for i = 1, N do
		local user, sender = "user" .. (i % R), ("sender%d@%s/bench"):format(i % 4, HOST)
		local xml = ("<message xmlns='jabber:client' id='s%d-%d' type='chat' to='%s@%s' from='%s'><body>%s</body></message>")
			:format(i % 4, i, user, HOST, sender, BODY)
		if not open then open = db:begin() end
		assert(db:store(HOST, user, sender, xml, i))
		if open and i % B == 0 then assert(db:commit()); open = false end
	end
	if open then assert(db:commit()) end
	local u1, s1 = cpu()
	local p = assert(io.popen("du -sb '" .. dir .. "'"))
	local bytes = tonumber(p:read("a"):match("^(%d+)"))
	p:close()
	local got = 0
	for r = 0, R - 1 do got = got + #assert(db:pop(HOST, "user" .. r, 0)) end
	local u2, s2 = cpu()
	db:close()
	assert(got == N, "popped " .. got .. " of " .. N)
	return { store_u = (u1 - u0) / N * 1e6, store_s = (s1 - s0) / N * 1e6,
		pop_u = (u2 - u1) / N * 1e6, pop_s = (s2 - s1) / N * 1e6, bytes = bytes }
end

local runs = {}
for _ = 1, REPS do
	local p = assert(io.popen("mktemp -d"))
	local dir = p:read("l")
	p:close()
	runs[#runs + 1] = one_run(dir)
	os.execute("rm -rf '" .. dir .. "'")
end

local function med(key, plus)
	local t = {}
	for i, r in ipairs(runs) do t[i] = r[key] + (plus and r[plus] or 0) end
	return median(t)
end

print(("sqlite core, N=%d stores to R=%d users in commits of %d, then a pop per user; medians of %d"):format(N, R, B, REPS))
print(("  store: %6.1f us CPU per message (user %.1f, system %.1f)"):format(
	med("store_u", "store_s"), med("store_u"), med("store_s")))
print(("  pop:   %6.1f us CPU per message (user %.1f, system %.1f)"):format(
	med("pop_u", "pop_s"), med("pop_u"), med("pop_s")))
print(("  both:  %6.1f us; on disk after the stores (WAL included): %.0f bytes per message"):format(
	med("store_u", "store_s") + med("pop_u", "pop_s"), med("bytes") / N))
