-- bench/postgres_latency.lua: how long one call of the store blocks Prosody's thread, postgres on
-- loopback next to sqlite, both with the same data. Prints medians and tails in microseconds.
--
--   make bench-postgres                      (or: lua5.4 bench/postgres_latency.lua [N])
--
-- Starts its own PostgreSQL (spec/support/postgres.lua) with the default fsync = on, on
-- 127.0.0.1 over TCP, and measures three configurations:
--   postgres           synchronous_commit = on (the default: each commit waits for its WAL flush)
--   postgres async     synchronous_commit = off (a server crash may lose the last commits, like
--                      sqlite's synchronous = normal losing them to a power cut)
--   sqlite             WAL, synchronous = normal (the default backend), a file in /tmp
-- Each store is prefilled with 2,000 users x 10 messages (postgres: through a second, asynchronous-
-- commit connection, to save time). Group commit: rounds of 32 stores to 32 users, each its own
-- transaction, then 32 in one batch (db:begin .. db:commit), then 32 sent in one batch (db:send,
-- pipelined, as the plugin does per loop turn; sqlite stores them at once), alternating, so all
-- see the same machine; per store, the round's time / 32. Per call: store (with a limit, so the
-- counter check runs), count, pop of an empty queue (every login), pop of 10 messages, list of
-- 10. N calls each (default 2000), after 100 unmeasured ones; wall time per call from
-- socket.gettime(). Run on an idle machine for figures worth quoting.

package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/?.so;" .. package.cpath
local core = require "offline_store.core"
local socket = require "socket"
local support = require "support.util"
local postgres = require "support.postgres"

local gettime, format = socket.gettime, string.format
local N = tonumber(arg[1] or os.getenv("BENCH_N") or "") or 2000
local WARM = 100
local H, FROM = "chat.example.org", "alice.martin17@chat.example.org/conversations-1f3a"
local XML = "<message xmlns='jabber:client' from='" .. FROM .. "' to='bob@chat.example.org' type='chat' "
	.. "id='m0001'><body>Meeting moved to 3pm, same room as usual.</body>"
	.. "<active xmlns='http://jabber.org/protocol/chatstates'/></message>"
local TS = 1700000000000000
local NOW = 4000000000000000
local USERS, PER_USER = 2000, 10

local function percentile(sorted, p)
	return sorted[math.max(1, math.ceil(#sorted * p))]
end

-- Times fn(i) for i = 1..N after WARM unmeasured calls; setup(i), if given, runs untimed first.
local function measure(fn, setup)
	local t = {}
	for i = 1, WARM + N do
		if setup then setup(i) end
		local t0 = gettime()
		fn(i)
		local dt = gettime() - t0
		if i > WARM then t[#t + 1] = dt * 1e6 end
	end
	table.sort(t)
	return { median = percentile(t, 0.5), p90 = percentile(t, 0.9), p99 = percentile(t, 0.99) }
end

local function prefill(db)
	for u = 1, USERS do
		for m = 1, PER_USER do assert(db:store(H, "user" .. u, FROM, XML, TS + m)) end
	end
end

local OPS = { "store", "store, own tx", "store, batch", "send, batch", "count", "pop (empty)", "pop (10)", "list (10)" }
local BATCH = 32

-- One store of a round: "send" pipelines it where the backend can (db:send, postgres), as the
-- plugin's batch does; sqlite has no such thing and stores at once.
local function store_one(db, kind, u)
	if kind == "send" then
		local ok, why = db:send(H, "user" .. u, FROM, XML, TS + u, nil, 1000000)
		if ok then return true end
		assert(why == "not pipelined", why)
	end
	return assert(db:store(H, "user" .. u, FROM, XML, TS + u, nil, 1000000))
end

-- Per store, in rounds of BATCH: each its own transaction, then BATCH in one batch, then BATCH
-- sent in one batch, alternating.
local function group_commit(db, r)
	local times, u = { own = {}, batch = {}, send = {} }, 0
	local function round(kind)
		local t0, sent = gettime(), 0
		if kind ~= "own" then assert(db:begin() ~= nil) end
		for _ = 1, BATCH do
			u = u % USERS + 1
			if store_one(db, kind, u) == true then sent = sent + 1 end
		end
		if kind ~= "own" then assert(db:commit()) end
		for i = 1, sent do assert(db:outcome(i)) end -- (every one stored)
		return (gettime() - t0) * 1e6 / BATCH
	end
	for i = 1, (WARM + N) // BATCH do
		for _, kind in ipairs({ "own", "batch", "send" }) do
			local t = round(kind)
			if i > WARM // BATCH then table.insert(times[kind], t) end
		end
	end
	for name, t in pairs({ ["store, own tx"] = times.own, ["store, batch"] = times.batch, ["send, batch"] = times.send }) do
		table.sort(t)
		r[name] = { median = percentile(t, 0.5), p90 = percentile(t, 0.9), p99 = percentile(t, 0.99) }
	end
end

local function run(name, db, filler)
	io.stderr:write(format("%s: prefilling %d messages...\n", name, USERS * PER_USER))
	prefill(filler or db)
	if filler then filler:close() end
	local r = {}
	r["store"] = measure(function(i)
		assert(db:store(H, "user" .. (i % USERS + 1), FROM, XML, TS + i, nil, 1000000))
	end)
	group_commit(db, r)
	r["count"] = measure(function(i) assert(db:count(H, "user" .. (i % USERS + 1))) end)
	r["pop (empty)"] = measure(function(i) assert(db:pop(H, "nobody" .. i, NOW)) end)
	r["pop (10)"] = measure(function(i) assert(#assert(db:pop(H, "popme" .. i, NOW)) == 10) end,
		function(i) for m = 1, 10 do assert(db:store(H, "popme" .. i, FROM, XML, TS + m)) end end)
	r["list (10)"] = measure(function(i) assert(#assert(db:list(H, "user" .. (i % USERS + 1), 0, 10)) == 10) end)
	db:close()
	return r
end

local results, names = {}, {}
local function add(name, r) names[#names + 1] = name; results[name] = r end

local dir = support.tmpdir()
local srv = postgres.start { durable = true }
local ok, err = pcall(function()
	local function open_pg(settings)
		local conninfo, schema = srv:fresh_conninfo(settings)
		return assert(core.open_postgres(conninfo)), assert(core.open_postgres(srv:conninfo_for(
			format("options='-csearch_path=%s -csynchronous_commit=off'", schema))))
	end
	add("postgres", run("postgres", open_pg()))
	add("postgres async", run("postgres async", open_pg("-csynchronous_commit=off")))
	add("sqlite", run("sqlite", assert(core.open_sqlite(dir .. "/bench.sqlite"))))
end)
srv:cleanup()
support.rmrf(dir)
assert(ok, err)

local _, cpus = support.sh("nproc")
print(format("Per-call latency, microseconds (median / p90 / p99), %d calls each, %s CPUs, %s",
	N, cpus:gsub("%s+", ""), os.date("!%Y-%m-%d")))
local head = { format("%-14s", "call") }
for _, name in ipairs(names) do head[#head + 1] = format("%22s", name) end
print(table.concat(head, " "))
for _, op in ipairs(OPS) do
	local row = { format("%-14s", op) }
	for _, name in ipairs(names) do
		local m = results[name][op]
		row[#row + 1] = format("%22s", format("%.0f / %.0f / %.0f", m.median, m.p90, m.p99))
	end
	print(table.concat(row, " "))
end
for _, name in ipairs(names) do
	print(format("%s: a store in a batch of %d takes %.2fx the time of one in its own transaction, "
		.. "%.2fx sent (medians)", name, BATCH, results[name]["store, batch"].median / results[name]["store, own tx"].median,
		results[name]["send, batch"].median / results[name]["store, own tx"].median))
end
