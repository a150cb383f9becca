-- bench/core.lua: throughput of offline_store.core, both backends, next to a
-- plain-sqlite3 baseline measured in the same run (bench/baseline.c).
--
--   make bench                     (full: 1k, 100k, 1M stored rows; ~2-3 min)
--   BENCH_QUICK=1 make bench       (1k and 10k rows; < 30 s)
--   lua5.4 bench/core.lua [--quick] [--sync-full] [--reps N] [--prefill-store] [--raw]
--
-- Environment, same meaning as the options: BENCH_QUICK=1, BENCH_SYNC=full,
-- BENCH_REPS=N (at least 5), BENCH_PREFILL=store, BENCH_RAW=1 (print every
-- repetition's value too).
--
-- The stores are prefilled (100 messages per user, users interleaved), one
-- per size and backend, plus one baseline file per size. Then, because this
-- kind of machine drifts in speed by tens of percent over a minute, the
-- measurements are interleaved: each repetition runs every sqlite
-- measurement once at every size, each right after the baseline at that
-- size (one `build/bench_core baseline --reps 1` per size and repetition,
-- on a file it prefilled once); then the same for the memory backend, after
-- `sync`. The limit check runs per size, alternating chunks of stores to
-- the 5000-queued and the 1-queued user.
-- The table shows medians over the repetitions, with the spread (half of
-- max - min, relative to the median). Timed stores are undone, untimed, so
-- every store keeps its size. Wall time is LuaSocket's socket.gettime().
--
-- The sqlite prefill goes through `build/bench_core prefill` (one bulk
-- transaction into the schema core.open_sqlite created) because 1M calls to
-- db:store, one transaction each, take minutes; --prefill-store does it
-- through db:store instead. The memory backend is always prefilled through
-- db:store. Run from the repository root.

package.cpath = "build/?.so;" .. package.cpath
local core = require "offline_store.core"
local socket = require "socket"
local gettime = socket.gettime
local cpuclock = os.clock -- this process's CPU time, for the memory store
local START = gettime()

---------------------------------------------------------------------------
-- Options

local function env_flag(name)
	local v = os.getenv(name)
	return v ~= nil and v ~= "" and v ~= "0"
end

local QUICK = env_flag("BENCH_QUICK")
local SYNC_FULL = os.getenv("BENCH_SYNC") == "full"
local PREFILL_STORE = os.getenv("BENCH_PREFILL") == "store"
local RAW = env_flag("BENCH_RAW") -- also print every repetition's value
local REPS = tonumber(os.getenv("BENCH_REPS") or "")
do
	local i = 1
	while arg[i] do
		local a = arg[i]
		if a == "--quick" then QUICK = true
		elseif a == "--sync-full" then SYNC_FULL = true
		elseif a == "--prefill-store" then PREFILL_STORE = true
		elseif a == "--raw" then RAW = true
		elseif a == "--reps" and arg[i + 1] then REPS = tonumber(arg[i + 1]); i = i + 1
		else
			io.stderr:write("usage: lua5.4 bench/core.lua [--quick] [--sync-full] [--reps N] [--prefill-store] [--raw]\n")
			os.exit(2)
		end
		i = i + 1
	end
end
REPS = math.max(5, math.floor(REPS or (QUICK and 5 or 7)))

local SIZES = QUICK and { 1000, 10000 } or { 1000, 100000, 1000000 }
local PER_USER = 100          -- prefilled messages per user
local TARGETS = 100           -- users the timed stores and counts go to, spread over all
-- Timed seconds per repetition of a throughput loop.
local MIN_TIME = QUICK and { sqlite = 0.1, memory = 0.05 } or { sqlite = 0.3, memory = 0.15 }
local STORE_CHUNK = 100       -- stores per timed chunk (see store_loop)
local POP_USERS = { sqlite = QUICK and 4 or 20, memory = 40 } -- pops per repetition
local POP_N = 100
local LIMIT_HEAVY = 5000      -- queued messages of the "heavy" user in the limit check
local NO_LIMIT = 1000000000   -- max_count that is never hit, but is checked
local BASELINE = "build/bench_core"

local HOST = "chat.example.org"

---------------------------------------------------------------------------
-- The generator; keep in step with bench/baseline.c.

local FIRST = { "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
	"ivan", "judy", "mallory", "niaj", "olivia", "peggy", "rupert", "sybil" }
local LAST = { "martin", "bernard", "dubois", "thomas", "robert", "richard", "petit", "durand",
	"leroy", "moreau", "simon", "laurent", "lefebvre", "michel", "garcia", "david" }
local BODIES = {
	"Are you around later? I pushed the fix.",
	"Meeting moved to 3pm, same room as usual.",
	"Thanks! Got the files, will review tonight.",
	"Did you see the deploy alert at midnight?",
	"Lunch on Friday? New ramen place nearby.",
	"Can you send me the link to the doc again?",
	"Running 10 minutes late, start without me.",
	"Happy birthday!! Drinks on me next time :)",
}

local function user_name(i)
	return ("%s.%s%d"):format(FIRST[i % 16 + 1], LAST[(i // 16) % 16 + 1], i)
end

local function sender_jid(k)
	return ("%s@%s/%s-%04x"):format(user_name((k * 7919) % 100000), HOST,
		(k & 1) == 1 and "conversations" or "gajim", (k * 2654435761) & 0xffff)
end

local function stanza(k)
	return ("<message xmlns='jabber:client' from='%s' type='chat' id='m%08x'>"
		.. "<body>%s</body>"
		.. "<active xmlns='http://jabber.org/protocol/chatstates'/>"
		.. "<delay xmlns='urn:xmpp:delay' from='%s' stamp='2024-05-%02dT%02d:%02d:%02dZ'/>"
		.. "</message>"):format(sender_jid(k), (k * 40503) & 0xffffffff, BODIES[k % 8 + 1],
		HOST, 1 + k % 28, k % 24, k % 60, (k * 7) % 60)
end

-- POOL[k + 1], FROM[k + 1] for k = 0 .. 63, indexed below as (i & 63) + 1.
local POOL, FROM = {}, {}
for k = 0, 63 do POOL[k + 1], FROM[k + 1] = stanza(k), sender_jid(k) end

-- The user that prefilled row k (0-based) goes to: blocks of 100 users,
-- round-robin within a block.
local function row_user(k, users)
	local first = k // (100 * PER_USER) * 100
	local width = math.min(100, users - first)
	return first + k % (100 * PER_USER) % width
end

local TS0 = 1700000000000000   -- prefilled rows' timestamps (us), as in baseline.c
local NOW = 4000000000000000    -- "now" for pop: later than everything, nothing expires

-- Timestamps of the stores made while measuring: one clock, always rising
-- (as arrival times do), so the ts index grows at its end.
local clock = 1800000000000000
local function ticks(n)
	local t = clock
	clock = clock + n
	return t
end

---------------------------------------------------------------------------
-- Helpers

local function log(fmt, ...)
	io.stderr:write(("[%6.1fs] "):format(gettime() - START) .. fmt:format(...) .. "\n")
	io.stderr:flush()
end

local function median(t)
	local s = table.move(t, 1, #t, 1, {})
	table.sort(s)
	local n = #s
	if n % 2 == 1 then return s[(n + 1) // 2] end
	return (s[n // 2] + s[n // 2 + 1]) / 2
end

-- { median =, spread = (max - min) / 2 / median, values = }
local function summary(values)
	local m = median(values)
	local lo, hi = math.huge, -math.huge
	for _, v in ipairs(values) do lo, hi = math.min(lo, v), math.max(hi, v) end
	return { median = m, spread = m > 0 and (hi - lo) / 2 / m or 0, values = values }
end

local function sh(cmd)
	local f = assert(io.popen(cmd .. " 2>&1", "r"))
	local out = f:read("a")
	local ok, how, code = f:close()
	if not ok then error(("command failed (%s %s): %s\n%s"):format(how, code, cmd, out), 0) end
	return out
end

local function read_first_line(path, pattern)
	local f = io.open(path, "r")
	if not f then return nil end
	for line in f:lines() do
		local v = line:match(pattern)
		if v then f:close(); return v end
	end
	f:close()
end

local function kv(line)
	local r = {}
	for k, v in line:gmatch("([%w_]+)=(%S+)") do r[k] = tonumber(v) or v end
	return r
end

local function size_label(n)
	if n >= 1000000 and n % 1000000 == 0 then return (n // 1000000) .. "M" end
	if n >= 1000 and n % 1000 == 0 then return (n // 1000) .. "k" end
	return tostring(n)
end

local function remove_db_files(path)
	for _, s in ipairs { "", "-wal", "-shm", "-journal" } do os.remove(path .. s) end
end

---------------------------------------------------------------------------
-- Measurements. Each returns one value for one repetition.

-- Removes timed stores: ops i0 + 1 .. i0 + n went to targets[i % #targets + 1]
-- and got ids first .. first + n - 1 (one writer gets consecutive ids from
-- both backends; checked by the count removed).
local function unstore(db, targets, i0, first, n)
	local nt = #targets
	local per = {}
	for i = i0 + 1, i0 + n do
		local t = i % nt + 1
		local ids = per[t]
		if not ids then ids = {}; per[t] = ids end
		ids[#ids + 1] = first + (i - i0 - 1)
	end
	local removed = 0
	for t, ids in pairs(per) do removed = removed + assert(db:remove(HOST, targets[t], ids)) end
	assert(removed == n, ("removed %d of %d timed stores"):format(removed, n))
end

-- A store loop in timed chunks: stores round-robin to `targets` with
-- max_count `max`, at most 10 per user per chunk (100 when all are refused),
-- so that queue lengths stay within 10 of where they started. `undo` says
-- how the timed stores are taken back, untimed:
--   "chunk":  after each chunk, its messages are removed by id (sqlite: the
--             same pages the stores wrote);
--   "pop":    after each chunk, each target is popped back to its length
--             (its oldest messages go; memory: O(1) per message, where
--             db:remove scans the whole queue per id);
--   "end":    after the last chunk, all of them, by id (the baseline does
--             the same with one DELETE; no other writes between timed ones);
--   "refuse": every store must be refused by the limit; nothing to undo.
local function new_loop(db, targets, max, undo)
	local nt = #targets
	local per = math.max(1, math.min(undo == "refuse" and 100 or 10, STORE_CHUNK // nt))
	return { db = db, targets = targets, max = max, undo = undo, per = per, chunk = per * nt,
		n = 0, busy = 0, cpu = 0, first = nil, times = {} }
end

local function run_chunk(L)
	local db, targets, max, chunk = L.db, L.targets, L.max, L.chunk
	local nt = #targets
	local pool, from = POOL, FROM
	local n = L.n
	local ts = ticks(chunk) - n
	local c0, c1
	local c = cpuclock()
	local t0 = gettime()
	for i = n + 1, n + chunk do
		local k = i & 63
		c0, c1 = db:store(HOST, targets[i % nt + 1], from[k + 1], pool[k + 1], ts + i, nil, max)
	end
	local dt = gettime() - t0
	L.cpu = L.cpu + (cpuclock() - c)
	L.busy = L.busy + dt
	L.times[#L.times + 1] = dt
	L.n = n + chunk
	if L.undo == "refuse" then
		assert(c0 == false and c1 == "limit", "store was not refused by the limit")
	else
		assert(c0, c1)
		if L.undo == "chunk" then
			unstore(db, targets, n, c1 - chunk + 1, chunk)
		elseif L.undo == "pop" then
			for t = 1, nt do
				local items = assert(db:pop(HOST, targets[t], NOW, L.per))
				assert(#items == L.per)
			end
		elseif not L.first then
			L.first = c1 - chunk + 1
		end
		L.last = c1
	end
end

local function finish_loop(L)
	if L.undo == "end" then
		assert(L.last - L.first + 1 == L.n, "ids were not consecutive")
		unstore(L.db, L.targets, 0, L.first, L.n)
	end
	return L.n / L.busy
end

-- Stores per second over at least MIN_TIME[backend] of timed chunks, and
-- stores per second of this process's CPU time in them.
local function store_loop(db, backend, targets, max, undo)
	local L = new_loop(db, targets, max, undo)
	collectgarbage("collect")
	repeat run_chunk(L) until L.busy >= MIN_TIME[backend]
	return finish_loop(L), L.n / L.cpu
end

-- Stores per second of the chunks that took at most 20 times the median
-- chunk: the others had the process descheduled (memory chunks take ~5 us,
-- a time slice of some other process ms).
local function undisturbed_rate(L)
	local limit, n, t = 20 * median(L.times), 0, 0
	for _, dt in ipairs(L.times) do
		if dt <= limit then n, t = n + 1, t + dt end
	end
	return n * L.chunk / t
end

-- Two store loops whose chunks alternate (a, b, a, b, ...), so that the
-- machine's drift hits both alike; returns both rates. For sqlite the rate
-- comes from the median chunk: the mean is dominated by WAL checkpoints
-- (an fsync of WAL and file every ~1000 written pages, i.e. every ~150
-- commits, whatever the queue length), and which of the two loops a
-- checkpoint lands in is chance. Memory chunks are too short (~5 us) for a
-- median at the clock's microsecond, so there it is the undisturbed rate.
local function store_pair(db, backend, ta, maxa, tb, maxb, undo)
	local A, B = new_loop(db, ta, maxa, undo), new_loop(db, tb, maxb, undo)
	collectgarbage("collect")
	repeat
		run_chunk(A)
		run_chunk(B)
	until A.busy >= MIN_TIME[backend] and B.busy >= MIN_TIME[backend]
	finish_loop(A)
	finish_loop(B)
	if backend == "sqlite" then
		return A.chunk / median(A.times), B.chunk / median(B.times)
	end
	return undisturbed_rate(A), undisturbed_rate(B)
end

local function count_loop(db, backend, targets)
	local nt = #targets
	collectgarbage("collect")
	local n, chunk, c = 0, 200, nil
	local t0 = gettime()
	local dt
	repeat
		for i = n + 1, n + chunk do c = db:count(HOST, targets[i % nt + 1]) end
		n = n + chunk
		dt = gettime() - t0
	until dt >= MIN_TIME[backend]
	assert(c == PER_USER, "count saw an unexpected queue length")
	return n / dt
end

-- POP_USERS[backend] fresh users get POP_N messages each (stored
-- interleaved, as real traffic would), then each queue is popped whole;
-- only the pops are timed. Returns the mean seconds per pop, leaving out
-- pops that took over 20 x the median one (descheduled: other load), and
-- the median pop (sqlite: the typical pop, without the WAL checkpoint that
-- one pop in about ten pays for).
local function pop_rep(db, backend, rep)
	local npop = POP_USERS[backend]
	local users = {}
	for p = 1, npop do users[p] = user_name(1000000 + rep * 1000 + p) end -- never prefilled
	for r = 1, POP_N do
		for p = 1, npop do
			local k = (r * npop + p) & 63
			assert(db:store(HOST, users[p], FROM[k + 1], POOL[k + 1], ticks(1), nil, NO_LIMIT))
		end
	end
	collectgarbage("collect")
	local times = {}
	for p = 1, npop do
		local t0 = gettime()
		local items = db:pop(HOST, users[p], NOW, POP_N)
		times[p] = gettime() - t0
		assert(items and #items == POP_N, "pop returned the wrong number of items")
	end
	assert(db:count(HOST, users[1]) == 0)
	local med = median(times)
	local n, total = 0, 0
	for _, dt in ipairs(times) do
		if dt <= 20 * med then n, total = n + 1, total + dt end
	end
	return total / n, med
end

---------------------------------------------------------------------------
-- Prefill

local function prefill_store(db, size)
	local users = (size + PER_USER - 1) // PER_USER
	local names = {}
	for u = 0, users - 1 do names[u + 1] = user_name(u) end
	for k = 0, size - 1 do
		local i = k & 63
		assert(db:store(HOST, names[row_user(k, users) + 1], FROM[i + 1], POOL[i + 1], TS0 + k * 1000))
	end
end

local function open_sqlite(path)
	return assert(core.open_sqlite(path, SYNC_FULL))
end

local function prefill(backend, size, dir)
	local t0 = gettime()
	local db, path
	if backend == "memory" then
		db = assert(core.open_memory())
		prefill_store(db, size)
	else
		path = ("%s/core-%d.db"):format(dir, size)
		remove_db_files(path)
		db = open_sqlite(path) -- creates the schema
		if PREFILL_STORE then
			prefill_store(db, size)
		else
			db:close()
			sh(("%s prefill --db %s --rows %d --per-user %d"):format(BASELINE, path, size, PER_USER))
			db = open_sqlite(path)
		end
	end
	-- Sanity: the first and last users are full, and the rows are the ones
	-- this file generates (bench_core mirrors the generator).
	local users = (size + PER_USER - 1) // PER_USER
	assert(db:count(HOST, user_name(0)) == PER_USER, "prefill: first user not full")
	assert(db:count(HOST, user_name(users - 1)) == PER_USER, "prefill: last user not full")
	local first = assert(db:list(HOST, user_name(0), 0, 1))[1]
	assert(first.xml == POOL[1] and first.from == FROM[1] and first.ts == TS0,
		"prefill: rows differ from the Lua generator")
	log("%-6s %5s prefill %.1f s", backend, size_label(size), gettime() - t0)
	collectgarbage("collect")
	return db, path
end

---------------------------------------------------------------------------
-- Runs

local function targets_for(size)
	local users = (size + PER_USER - 1) // PER_USER
	local nt = math.min(TARGETS, users)
	local t = {}
	for j = 0, nt - 1 do t[j + 1] = user_name(j * users // nt) end
	return t
end

local function push(r, key, v)
	r[key] = r[key] or {}
	table.insert(r[key], v)
end

-- One repetition of the main measurements on one store.
local function main_rep(s, rep)
	local db, be, r = s.db, s.backend, s.values
	local wall, cpu = store_loop(db, be, s.targets, NO_LIMIT, be == "sqlite" and "end" or "pop")
	push(r, "store", wall)
	push(r, "store_cpu", cpu)
	local mean, med = pop_rep(db, be, rep)
	push(r, "pop", mean)
	push(r, "pop_median", med)
	push(r, "count", count_loop(db, be, s.targets))
end

-- The limit check on one store: a user with 5000 queued messages against
-- one with 1 (set up through db:store, removed afterwards), their chunks
-- alternating; accepted stores (max_count never reached) and refused ones
-- (max_count 5000 and 1).
local function limit_reps(s)
	local db, be, r = s.db, s.backend, s.values
	local heavy, light = { user_name(2000000) }, { user_name(2000001) } -- never prefilled
	for k = 1, LIMIT_HEAVY do
		assert(db:store(HOST, heavy[1], FROM[(k & 63) + 1], POOL[(k & 63) + 1], ticks(1), nil, NO_LIMIT))
	end
	assert(db:store(HOST, light[1], FROM[1], POOL[1], ticks(1), nil, NO_LIMIT))
	assert(db:count(HOST, heavy[1]) == LIMIT_HEAVY and db:count(HOST, light[1]) == 1)
	local undo = be == "sqlite" and "chunk" or "pop"
	for rep = 1, REPS do
		-- Which one goes first alternates too.
		local a, b
		if rep % 2 == 1 then
			a, b = store_pair(db, be, heavy, NO_LIMIT, light, NO_LIMIT, undo)
		else
			b, a = store_pair(db, be, light, NO_LIMIT, heavy, NO_LIMIT, undo)
		end
		push(r, "accept_heavy", a)
		push(r, "accept_light", b)
		if rep % 2 == 1 then
			a, b = store_pair(db, be, heavy, LIMIT_HEAVY, light, 1, "refuse")
		else
			b, a = store_pair(db, be, light, 1, heavy, LIMIT_HEAVY, "refuse")
		end
		push(r, "reject_heavy", a)
		push(r, "reject_light", b)
	end
	assert(db:count(HOST, heavy[1]) == LIMIT_HEAVY and db:count(HOST, light[1]) == 1)
	assert(db:remove_user(HOST, heavy[1]) == LIMIT_HEAVY and db:remove_user(HOST, light[1]) == 1)
end

local function baseline_run(path, size, reps)
	local cmd = ("%s baseline --db %s --rows %d --per-user %d --targets %d --reps %d --min-time %g --sync %s")
		:format(BASELINE, path, size, PER_USER, TARGETS, reps, MIN_TIME.sqlite, SYNC_FULL and "full" or "normal")
	local out = sh(cmd)
	local line = assert(out:match("(baseline [^\n]*)"), "no result line from " .. cmd .. ":\n" .. out)
	return kv(line)
end

---------------------------------------------------------------------------
-- Report

-- Medians of per-repetition ratios a[i] / b[i]: pairs measured close in
-- time, so the machine's drift cancels out of each ratio.
local function ratios(a, b)
	local v = {}
	for i = 1, math.min(#a, #b) do v[i] = a[i] / b[i] end
	return summary(v)
end

local function fmt_rate(s)
	return ("%.0f ±%.0f%%"):format(s.median, s.spread * 100)
end

local function fmt_us(s)
	return ("%.0f ±%.0f%%"):format(s.median * 1e6, s.spread * 100)
end

local function fmt_ratio(s)
	return ("%.2f ±%.0f%%"):format(s.median, s.spread * 100)
end

local function report(V, B, info)
	local first, last = SIZES[1], SIZES[#SIZES]
	local W = 17
	local head = ("%-46s %-6s"):format(("measurement (median of %d)"):format(REPS), "unit")
	for _, n in ipairs(SIZES) do head = head .. ("%" .. W .. "s"):format(size_label(n) .. " rows") end
	print(head)
	print(("-"):rep(#head))
	local function row(name, unit, f)
		local s = ("%-46s %-6s"):format(name, unit)
		for _, n in ipairs(SIZES) do s = s .. ("%" .. W .. "s"):format(f(n)) end
		print(s)
	end
	local R = {} -- summaries and ratios, kept for the targets
	for _, be in ipairs { "sqlite", "memory" } do
		R[be] = {}
		for _, n in ipairs(SIZES) do
			local v, x = V[be][n], {}
			for k, vals in pairs(v) do x[k] = summary(vals) end
			if be == "sqlite" then x.vs_base = ratios(v.store, B[n]) end
			x.pop_vs_first = ratios(v.pop, V[be][first].pop)
			x.pop_median_vs_first = ratios(v.pop_median, V[be][first].pop_median)
			x.accept_ratio = ratios(v.accept_heavy, v.accept_light)
			x.reject_ratio = ratios(v.reject_heavy, v.reject_light)
			R[be][n] = x
		end
	end
	row("baseline: sqlite3 INSERT, 1 txn each", "ops/s", function(n) return fmt_rate(summary(B[n])) end)
	for _, be in ipairs { "sqlite", "memory" } do
		local function get(key, fmt) return function(n) return fmt(R[be][n][key]) end end
		row(be .. ": store (limit on)", "ops/s", get("store", fmt_rate))
		if be == "memory" then
			row(be .. ": store (limit on), per CPU second", "ops/s", get("store_cpu", fmt_rate))
		end
		if be == "sqlite" then row(be .. ": store / baseline", "ratio", get("vs_base", fmt_ratio)) end
		row(be .. ": pop of 100, mean", "us/pop", get("pop", fmt_us))
		row(be .. ": pop of 100, mean / mean at " .. size_label(first), "ratio", get("pop_vs_first", fmt_ratio))
		row(be .. ": pop of 100, median", "us/pop", get("pop_median", fmt_us))
		row(be .. ": pop of 100, median / median at " .. size_label(first), "ratio",
			get("pop_median_vs_first", fmt_ratio))
		row(be .. ": count", "ops/s", get("count", fmt_rate))
		local star = be == "sqlite" and " *" or " **"
		row(be .. ": store accepted, user at 5000" .. star, "ops/s", get("accept_heavy", fmt_rate))
		row(be .. ": store accepted, user at 1" .. star, "ops/s", get("accept_light", fmt_rate))
		row(be .. ": accepted, limit at 5000 / at 1", "ratio", get("accept_ratio", fmt_ratio))
		row(be .. ": store refused, max=5000 at 5000" .. star, "ops/s", get("reject_heavy", fmt_rate))
		row(be .. ": store refused, max=1 at 1" .. star, "ops/s", get("reject_light", fmt_rate))
		row(be .. ": refused, limit at 5000 / at 1", "ratio", get("reject_ratio", fmt_ratio))
	end
	if RAW then
		print()
		print("raw values per repetition, in the order measured:")
		for _, be in ipairs { "sqlite", "memory" } do
			for _, n in ipairs(SIZES) do
				local keys = {}
				for k in pairs(V[be][n]) do keys[#keys + 1] = k end
				table.sort(keys)
				for _, k in ipairs(keys) do
					local t = {}
					for i, x in ipairs(V[be][n][k]) do t[i] = ("%.6g"):format(x) end
					print(("  %s %s %s: %s"):format(be, size_label(n), k, table.concat(t, " ")))
				end
			end
		end
		for _, n in ipairs(SIZES) do
			local t = {}
			for i, x in ipairs(B[n]) do t[i] = ("%.6g"):format(x) end
			print(("  baseline %s: %s"):format(size_label(n), table.concat(t, " ")))
		end
	end
	print("± is half the range over the repetitions, relative to the median; ratios are medians of")
	print("per-repetition ratios of measurements taken back to back. * from the median chunk of 10")
	print("(refused: 100) stores, i.e. without the WAL checkpoints (fsync) that come every ~150")
	print("commits whatever the queue length and land on either side of the comparison by chance;")
	print("the sqlite store row above includes them, as does the baseline. ** leaving out chunks")
	print("that took over 20 x the median chunk (the process was descheduled: other load); pops")
	print("are left out likewise from the mean pop. Mean and median pop are per repetition.")
	print()

	local function verdict(ok) return ok and "MET   " or "MISSED" end
	local function each(f)
		local t = {}
		for _, n in ipairs(SIZES) do t[#t + 1] = size_label(n) .. " " .. f(n) end
		return table.concat(t, ", ")
	end
	local worst = math.huge
	for _, n in ipairs(SIZES) do worst = math.min(worst, R.sqlite[n].vs_base.median) end
	print(("%-52s %s  %s"):format("target: sqlite store >= 0.50 x baseline", verdict(worst >= 0.5),
		each(function(n) return ("%.2f"):format(R.sqlite[n].vs_base.median) end)))
	for _, be in ipairs { "sqlite", "memory" } do
		local x = R[be][last].pop_vs_first.median
		print(("%-52s %s  %.2f (mean pop %.0f us at %s, %.0f us at %s; median pops: %.2f)"):format(
			("target: %s pop of 100 at %s <= 2 x at %s"):format(be, size_label(last), size_label(first)),
			verdict(x <= 2), x, R[be][last].pop.median * 1e6, size_label(last),
			R[be][first].pop.median * 1e6, size_label(first), R[be][last].pop_median_vs_first.median))
	end
	local mworst = math.huge
	for _, n in ipairs(SIZES) do mworst = math.min(mworst, R.memory[n].store.median) end
	print(("%-52s %s  %s (per CPU second: %s)"):format("target: memory store >= 1,000,000 ops/s",
		verdict(mworst >= 1e6), each(function(n) return ("%.0f"):format(R.memory[n].store.median) end),
		each(function(n) return ("%.0f"):format(R.memory[n].store_cpu.median) end)))
	for _, be in ipairs { "sqlite", "memory" } do
		local lo = math.huge
		for _, n in ipairs(SIZES) do
			lo = math.min(lo, R[be][n].accept_ratio.median, R[be][n].reject_ratio.median)
		end
		print(("%-52s %s  accepted/refused %s"):format(
			("target: %s limit at 5000 costs as at 1 (ratio >= 0.90)"):format(be), verdict(lo >= 0.9),
			each(function(n) return ("%.2f/%.2f"):format(R[be][n].accept_ratio.median, R[be][n].reject_ratio.median) end)))
	end
	print()
	print(info.machine)
	print(info.command)
	io.stdout:flush()
end

---------------------------------------------------------------------------
-- Main

local function loadavg()
	return read_first_line("/proc/loadavg", "^(%S+ %S+ %S+)") or "?"
end
local LOAD_START = loadavg()

-- Other work on the machine shows in the load averages (1, 5, 15 min).
local function machine_info(sqlite_version)
	local cpu = read_first_line("/proc/cpuinfo", "^model name%s*:%s*(.-)%s*$") or "?"
	local nproc = sh("nproc"):match("%d+") or "?"
	local kernel = sh("uname -r"):match("%S+") or "?"
	return ("machine: cpu=\"%s\" nproc=%s sqlite=%s %s kernel=%s tmpdir=/tmp loadavg start=[%s] end=[%s]")
		:format(cpu, nproc, sqlite_version or "?", (_VERSION:gsub(" ", "")), kernel, LOAD_START, loadavg())
end

local function command_line()
	local env = {}
	for _, name in ipairs { "BENCH_QUICK", "BENCH_SYNC", "BENCH_REPS", "BENCH_PREFILL", "BENCH_RAW" } do
		local v = os.getenv(name)
		if v then env[#env + 1] = name .. "=" .. v end
	end
	local cmd = { table.unpack(env) }
	cmd[#cmd + 1] = arg[-1] or "lua5.4"
	cmd[#cmd + 1] = arg[0]
	for i = 1, #arg do cmd[#cmd + 1] = arg[i] end
	return ("command: %s   (mode=%s sync=%s reps=%d timed s/rep sqlite=%g memory=%g, prefill=%s)"):format(
		table.concat(cmd, " "), QUICK and "quick" or "full", SYNC_FULL and "FULL" or "NORMAL", REPS,
		MIN_TIME.sqlite, MIN_TIME.memory,
		PREFILL_STORE and "db:store" or "bench_core (sqlite), db:store (memory)")
end

local dir = sh("mktemp -d /tmp/offline-store-bench.XXXXXX"):match("^(/tmp/offline%-store%-bench%.%w+)%s*$")
assert(dir, "mktemp failed")

local ok, err = xpcall(function()
	local f = io.open(BASELINE, "r")
	if not f then error(BASELINE .. " is missing: run `make build/bench_core` (or `make bench`)", 0) end
	f:close()
	local labels = {}
	for i, n in ipairs(SIZES) do labels[i] = size_label(n) end
	log("sizes %s, %d repetitions, temp dir %s", table.concat(labels, " "), REPS, dir)

	-- Prefill everything.
	local stores, base, sqlite_version = {}, {}, nil
	for _, size in ipairs(SIZES) do
		local path = ("%s/baseline-%d.db"):format(dir, size)
		local t0 = gettime()
		local r = baseline_run(path, size, 0)
		sqlite_version = r.sqlite
		base[size] = { path = path, values = {} }
		log("base   %5s prefill %.1f s", size_label(size), gettime() - t0)
		for _, be in ipairs { "sqlite", "memory" } do
			local db, dbpath = prefill(be, size, dir)
			stores[#stores + 1] = { backend = be, size = size, db = db, path = dbpath,
				targets = targets_for(size), values = {} }
		end
	end

	-- Prefilling leaves a gigabyte of dirty pages; the first fsync (a WAL
	-- checkpoint) would pay for writing them out.
	os.execute("sync")

	-- sqlite: per repetition and size, the baseline right before the core.
	for rep = 1, REPS do
		for _, size in ipairs(SIZES) do
			local r = baseline_run(base[size].path, size, 1)
			table.insert(base[size].values, r.median_ops_s)
			for _, s in ipairs(stores) do
				if s.size == size and s.backend == "sqlite" then main_rep(s, rep) end
			end
		end
		log("sqlite repetition %d of %d done", rep, REPS)
	end
	local function limit_checks(backend)
		for _, s in ipairs(stores) do
			if s.backend == backend then
				limit_reps(s)
				log("%s %5s limit check done", backend, size_label(s.size))
			end
		end
	end
	limit_checks("sqlite")

	-- memory, apart: the kernel's writeback of the sqlite files' pages
	-- takes CPU time on this machine's other core, which is noise here.
	os.execute("sync")
	for rep = 1, REPS do
		for _, s in ipairs(stores) do
			if s.backend == "memory" then main_rep(s, rep) end
		end
	end
	log("memory repetitions done")
	limit_checks("memory")

	local V, B = { sqlite = {}, memory = {} }, {}
	for _, s in ipairs(stores) do
		V[s.backend][s.size] = s.values
		s.db:close()
		if s.path then remove_db_files(s.path) end
	end
	for _, size in ipairs(SIZES) do
		B[size] = base[size].values
		remove_db_files(base[size].path)
	end
	log("done")
	report(V, B, { machine = machine_info(sqlite_version), command = command_line() })
end, debug.traceback)


os.execute("rm -rf '" .. dir .. "'")
if not ok then
	io.stderr:write("bench failed: ", tostring(err), "\n")
	os.exit(1)
end
