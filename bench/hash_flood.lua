-- bench/hash_flood.lua: what names chosen to collide cost the core's hash tables, next to
-- random names, measured in the same run.
--
--   make bench-hash
--   lua5.4 bench/hash_flood.lua [-n N] [--runs R]      (defaults: 50,000 names, 5 runs)
--
-- The colliding names are valid usernames that all share the low 24 bits of FNV-1a, the
-- unkeyed hash the tables used before (spec/support/collide.lua makes them); the random
-- ones have the same length. For each table and each set of names, on a fresh table:
--   memory   db:store of one message for each name (core.open_memory)
--   sqlite   the same into a fresh sqlite file (the counter cache: one entry per user)
--   cache    core.cache(50000) as mod_offline keeps recipients' limits: set of every
--            name@host, then get of every one
-- Each run measures every table with both sets, in alternating order. The table shows
-- medians over the runs of CPU µs per operation (os.clock: this process only, so other
-- load on the machine counts less) and of the per-run ratio colliding / random.
-- Target: colliding names cost at most 2x random ones. Run from the repository root.

package.path = "spec/?.lua;" .. package.path
package.cpath = "build/?.so;" .. package.cpath
local core = require "offline_store.core"
local collide = require "support.collide"
local support = require "support.util"

local N, RUNS = 50000, 5
do
	local i = 1
	while arg[i] do
		if arg[i] == "-n" and tonumber(arg[i + 1]) then N = math.tointeger(tonumber(arg[i + 1])); i = i + 1
		elseif arg[i] == "--runs" and tonumber(arg[i + 1]) then RUNS = math.tointeger(tonumber(arg[i + 1])); i = i + 1
		else
			io.stderr:write("usage: lua5.4 bench/hash_flood.lua [-n N] [--runs R]\n")
			os.exit(2)
		end
		i = i + 1
	end
end

local HOST, FROM, XML, T0 = "example.test", "alice@example.org", "<message><body>hi</body></message>", 1700000000000000
local CACHE_KEPT = 50000 -- mod_offline's LIMITS_KEPT

local t_start = os.clock()
local sets = {
	colliding = { queue = collide.names(HOST .. "\255", N, 24), cache = collide.names("", N, 24) },
}
sets.random = { queue = collide.random_names(N, #sets.colliding.queue[1]) }
sets.random.cache = sets.random.queue
for _, set in pairs(sets) do
	set.keys = {}
	for i, name in ipairs(set.cache) do set.keys[i] = name .. "@" .. HOST end
end
io.write(("%d names a set, %d-character usernames, made in %.1f s\n"):format(N, #sets.colliding.queue[1],
	os.clock() - t_start))

local dir = support.tmpdir()

-- Each returns CPU seconds and the number of operations.
local function store_all(db, names)
	local t = os.clock()
	for i = 1, #names do assert(db:store(HOST, names[i], FROM, XML, T0 + i)) end
	t = os.clock() - t
	-- every name got its own queue
	assert(db:count(HOST, names[1]) == 1 and db:count(HOST, names[#names]) == 1)
	return t, #names
end

local measure = {
	memory = function(set)
		local db = core.open_memory()
		local t, n = store_all(db, set.queue)
		db:close()
		return t, n
	end,
	sqlite = function(set)
		local file = dir .. "/flood.sqlite"
		local db = assert(core.open_sqlite(file))
		local t, n = store_all(db, set.queue)
		db:close()
		support.exec("rm -f " .. support.quote(file) .. "*")
		return t, n
	end,
	cache = function(set)
		local c, keys = core.cache(CACHE_KEPT), set.keys
		local t = os.clock()
		for i = 1, #keys do c:set(keys[i], i) end
		for i = 1, #keys do assert(c:get(keys[i]) == i) end
		t = os.clock() - t
		assert(#c == math.min(#keys, CACHE_KEPT))
		return t, 2 * #keys
	end,
}
local TABLES = { "memory", "sqlite", "cache" }

local function median(t)
	table.sort(t)
	local n = #t
	return n % 2 == 1 and t[(n + 1) // 2] or (t[n // 2] + t[n // 2 + 1]) / 2
end

local us, ratio = {}, {}
for _, name in ipairs(TABLES) do us[name] = { colliding = {}, random = {} }; ratio[name] = {} end
for run = 1, RUNS do
	for _, name in ipairs(TABLES) do
		local order = run % 2 == 1 and { "colliding", "random" } or { "random", "colliding" }
		local got = {}
		for _, which in ipairs(order) do
			collectgarbage()
			local t, n = measure[name](sets[which])
			got[which] = t * 1e6 / n
			table.insert(us[name][which], got[which])
		end
		table.insert(ratio[name], got.colliding / got.random)
	end
	io.write(("run %d of %d done (%.0f s)\n"):format(run, RUNS, os.clock() - t_start))
end
support.rmrf(dir)

local ops = { memory = "store", sqlite = "store", cache = "set+get" }
io.write(("\n%-8s %-8s %14s %14s %10s\n"):format("table", "op", "colliding us", "random us", "ratio"))
local worst = 0
for _, name in ipairs(TABLES) do
	local r = median(ratio[name])
	worst = math.max(worst, r)
	io.write(("%-8s %-8s %14.3f %14.3f %9.2fx\n"):format(name, ops[name], median(us[name].colliding),
		median(us[name].random), r))
end
io.write(("\ntarget: colliding names cost <= 2x random ones    %s    worst ratio %.2fx\n"):format(
	worst <= 2 and "MET" or "NOT MET", worst))
local f = io.open("/proc/loadavg")
local load = f and f:read("l"):match("^%S+ %S+ %S+") or "?"
if f then f:close() end
io.write(("medians of %d runs, CPU time of this process; n=%d; loadavg %s\n"):format(RUNS, N, load))
