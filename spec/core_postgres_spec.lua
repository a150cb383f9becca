-- The postgres backend beyond the shared contract: exactness with several processes on one
-- user (limit, pop against stores, bulk deletes against both), a server restarted under the
-- store, unreachable servers (calls that do not wait for them) and wrong credentials, a pop
-- abandoned by an emit that raised, schema versions, the facade's config.
-- Runs against a throwaway PostgreSQL (spec/support/postgres.lua); fails if it cannot start,
-- skips (visibly) only with OFFLINE_STORE_SKIP_POSTGRES=1.

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local support = require "support.util"
local postgres = require "support.postgres"
local core = require "offline_store.core"
local offline_store = require "offline_store"
local socket = require "socket"

local q, format, concat = support.quote, string.format, table.concat
local H, FROM = "example.org", "alice@example.org/phone"
local T0 = 1700000000 * 1000000
local LUA = os.getenv("LUA") or "lua5.4"
local ROOT = select(2, support.sh("pwd")):gsub("%s+$", "")

local function server() return postgres.require_server(lu) end

-- fail_over(bytes | nil): the Lua allocator refuses blocks over `bytes` (spec/support/alloc_fault.c).
local function alloc_fault()
	local open = package.loadlib(ROOT .. "/build/alloc_fault.so", "luaopen_alloc_fault")
	assert(open, "build/alloc_fault.so is missing: make build/alloc_fault.so")
	return open()
end

local function fresh()
	local conninfo, schema = server():fresh_conninfo()
	return assert(core.open_postgres(conninfo)), conninfo, schema
end

---------------------------------------------------------------------------------------------------
-- Worker processes (spec/support/postgres_worker.lua)

-- The sanitizer runtime (make test-asan) has to be preloaded into workers too.
local function worker(mode, conninfo, dir, name, start_at, opts)
	local parts = { LUA, q(ROOT .. "/spec/support/postgres_worker.lua"), mode, q(conninfo),
		q(dir .. "/" .. name), format("%.3f", start_at) }
	local preload = os.getenv("LD_PRELOAD")
	if preload then table.insert(parts, 1, "LD_PRELOAD=" .. q(preload)) end
	for k, v in pairs(opts or {}) do parts[#parts + 1] = q(k .. "=" .. tostring(v)) end
	return concat(parts, " ")
end

-- Runs shell `cmd` (which starts the workers and waits for them), then parses each output file:
-- { name = { ok = {...}, limit = n, fail = {...}, pop = {...}, expired = n, touched = n, done = bool } }
local function run_workers(dir, names, cmd)
	local ok, out = support.sh(cmd)
	assert(ok, out)
	local res = {}
	for _, name in ipairs(names) do
		local r = { ok = {}, limit = 0, dup = 0, lost = 0, leased = {}, fail = {}, pop = {}, expired = 0, touched = 0, evicted = 0,
			done = false }
		for line in (support.read(dir .. "/" .. name) or ""):gmatch("[^\n]+") do
			local kind, a, b, c = line:match("^(%S+) ?(%S*) ?(%S*) ?(.*)$")
			if kind == "ok" then r.ok[#r.ok + 1] = { id = tonumber(a), xml = b, user = c }
			elseif kind == "limit" then r.limit = r.limit + 1
			elseif kind == "dup" then r.dup = r.dup + 1
			elseif kind == "leased" then
				local ids = {}
				for id in a:gmatch("%d+") do ids[#ids + 1] = tonumber(id) end
				r.leased[#r.leased + 1] = ids
			elseif kind == "pop" then r.pop[#r.pop + 1] = { id = tonumber(a), xml = b }
			elseif kind == "expired" then r.expired = r.expired + tonumber(a)
			elseif kind == "touched" then r.touched = r.touched + tonumber(a)
			elseif kind == "evicted" then r.evicted = r.evicted + tonumber(a)
			elseif kind == "lost" then r.lost = r.lost + tonumber(a)
			elseif kind == "fail" then r.fail[#r.fail + 1] = line
			elseif kind == "done" then r.done = true end
		end
		lu.assertTrue(r.done, name .. " did not finish: " .. (support.read(dir .. "/" .. name) or "(no output)"))
		lu.assertEquals(r.fail, {}, name .. " had failures")
		res[name] = r
	end
	return res
end

local function assert_counter(db, user)
	local items = assert(db:list(H, user))
	local bytes = 0
	for _, it in ipairs(items) do bytes = bytes + #it.xml end
	lu.assertEquals({ db:count(H, user) }, { #items, bytes }, "counter of " .. user .. " disagrees with its rows")
	return items
end

---------------------------------------------------------------------------------------------------
TestPostgresConcurrency = {}

function TestPostgresConcurrency:setUp()
	self.db, self.conninfo = fresh()
	self.dir = support.tmpdir()
end

function TestPostgresConcurrency:tearDown()
	if self.db then self.db:close() end
	if self.dir then support.rmrf(self.dir) end
end

-- Four processes store 60 each to one new user with a limit of 50: exactly 50 are stored.
function TestPostgresConcurrency:test_limit_exact_across_processes()
	local start_at, names, cmds = socket.gettime() + 1.5, {}, {}
	for i = 1, 4 do
		names[i] = "store" .. i
		cmds[i] = worker("store", self.conninfo, self.dir, names[i], start_at,
			{ n = 60, max = 50, tag = "p" .. i, user = "bob" }) .. " &"
	end
	local res = run_workers(self.dir, names, concat(cmds, " ") .. " wait")
	local stored, limited, ids = 0, 0, {}
	for _, name in ipairs(names) do
		stored = stored + #res[name].ok
		limited = limited + res[name].limit
		for _, it in ipairs(res[name].ok) do
			lu.assertNil(ids[it.id], "an id was handed out twice")
			ids[it.id] = true
		end
	end
	lu.assertEquals(stored, 50)
	lu.assertEquals(limited, 190)
	lu.assertEquals(#assert_counter(self.db, "bob"), 50)
end

-- The same with a bytes limit: 3 processes, 9 messages of 5 bytes each, max 100 bytes.
function TestPostgresConcurrency:test_bytes_limit_exact_across_processes()
	local start_at, names, cmds = socket.gettime() + 1.5, {}, {}
	for i = 1, 3 do
		names[i] = "store" .. i
		cmds[i] = worker("store", self.conninfo, self.dir, names[i], start_at,
			{ n = 9, max_bytes = 100, tag = "pp" .. i, user = "bob" }) .. " &" -- "ppN:i" is 5 bytes
	end
	local res = run_workers(self.dir, names, concat(cmds, " ") .. " wait")
	local stored = 0
	for _, name in ipairs(names) do stored = stored + #res[name].ok end
	lu.assertEquals({ self.db:count(H, "bob") }, { 20, 100 }, "20 messages of 5 bytes fill 100 bytes")
	lu.assertEquals(stored, 20)
	assert_counter(self.db, "bob")
end

-- drop_oldest (store's evict) under concurrent writers: every store is taken, the queue ends at
-- exactly the limit (count, or bytes: 5-byte messages, 50 bytes), the evictions add up to what
-- was stored beyond it, and the rows kept are the most recent ones (the highest ids).
local function evicting_writers(spec, limit_opts, kept, n)
	local start_at, names, cmds = socket.gettime() + 1.5, {}, {}
	for i = 1, 3 do
		names[i] = "store" .. i
		local opts = { n = n, tag = "pp" .. i, user = "bob", evict = 1 } -- "ppN:i": 5 bytes up to i = 9
		for k, v in pairs(limit_opts) do opts[k] = v end
		cmds[i] = worker("store", spec.conninfo, spec.dir, names[i], start_at, opts) .. " &"
	end
	local res = run_workers(spec.dir, names, concat(cmds, " ") .. " wait")
	local stored, evicted, all = 0, 0, {}
	for _, name in ipairs(names) do
		lu.assertEquals(res[name].limit, 0, "drop_oldest refuses nothing that fits")
		stored, evicted = stored + #res[name].ok, evicted + res[name].evicted
		for _, it in ipairs(res[name].ok) do all[#all + 1] = it.id end
	end
	lu.assertEquals(stored, 3 * n)
	local items = assert_counter(spec.db, "bob")
	lu.assertEquals(#items, kept)
	lu.assertEquals(evicted, 3 * n - kept, "each eviction counted once")
	table.sort(all)
	local want, got = {}, {}
	for i = #all - kept + 1, #all do want[#want + 1] = all[i] end
	for i, it in ipairs(items) do got[i] = it.id end
	lu.assertEquals(got, want, "the most recent are kept")
end

function TestPostgresConcurrency:test_drop_oldest_exact_across_processes()
	evicting_writers(self, { max = 10 }, 10, 40)
end

function TestPostgresConcurrency:test_drop_oldest_by_bytes_exact_across_processes()
	evicting_writers(self, { max_bytes = 22 }, 4, 9) -- (9 each: all 5 bytes)
end

-- Four processes store the same 40 dedup keys to one user at once: each key is stored once,
-- the other three see "duplicate" (the unique index decides the races the lookup misses).
function TestPostgresConcurrency:test_dedup_exact_across_processes()
	local start_at, names, cmds = socket.gettime() + 1.5, {}, {}
	for i = 1, 4 do
		names[i] = "store" .. i
		cmds[i] = worker("store", self.conninfo, self.dir, names[i], start_at,
			{ n = 40, dedup = "k", tag = "p" .. i, user = "bob" }) .. " &"
	end
	local res = run_workers(self.dir, names, concat(cmds, " ") .. " wait")
	local stored, dups = 0, 0
	for _, name in ipairs(names) do
		stored, dups = stored + #res[name].ok, dups + res[name].dup
		lu.assertEquals(res[name].limit, 0)
	end
	lu.assertEquals({ stored, dups }, { 40, 120 })
	lu.assertEquals(#assert_counter(self.db, "bob"), 40)
	lu.assertEquals(self.db:store(H, "bob", FROM, "x", T0, nil, nil, nil, nil, "k:17"), false)
end

-- Two nodes lease for one user at once (each confirms what it got, then leases again): every
-- row goes out once, and each lease is a run of consecutive rows: a node never takes rows behind
-- rows the other holds (the lease is taken under the user's lock, in id order).
function TestPostgresConcurrency:test_two_nodes_leasing_one_user_keep_arrival_order()
	for i = 1, 300 do assert(self.db:store(H, "bob", FROM, "m" .. i, T0 + i)) end
	local all = {}
	for i, it in ipairs(self.db:list(H, "bob")) do all[i] = it.id end
	local start_at, names, cmds = socket.gettime() + 1.5, {}, {}
	for i = 1, 2 do
		names[i] = "node" .. i
		cmds[i] = worker("lease", self.conninfo, self.dir, names[i], start_at, { tag = "node" .. i .. ":1", user = "bob" }) .. " &"
	end
	local res = run_workers(self.dir, names, concat(cmds, " ") .. " wait")
	local pos, seen, runs = {}, {}, 0
	for i, id in ipairs(all) do pos[id] = i end
	for _, name in ipairs(names) do
		lu.assertTrue(#res[name].leased > 0, name .. " leased nothing (the test did not test)")
		for _, ids in ipairs(res[name].leased) do
			runs = runs + 1
			for j, id in ipairs(ids) do
				lu.assertNil(seen[id], "row " .. id .. " leased twice")
				seen[id] = true
				if j > 1 then lu.assertEquals(pos[id], pos[ids[j - 1]] + 1, "a lease skipped rows") end
			end
		end
	end
	for _, id in ipairs(all) do lu.assertTrue(seen[id], "row " .. id .. " never leased") end
	lu.assertEquals({ self.db:count(H, "bob") }, { 0, 0 })
end

-- Two live stores releasing the same owner prefix (two servers started with the same node
-- name): the first holds the prefix for as long as its connection lives; the second releases
-- nothing and says so (SQLSTATE 55P03), other prefixes are not affected, and once the first
-- has closed the prefix is free. A store in another schema (another deployment) is no twin.
function TestPostgresConcurrency:test_a_twin_releases_nothing()
	local LOCK_NOT_AVAILABLE = tonumber("55P03", 36)
	for i = 1, 3 do assert(self.db:store(H, "bob", FROM, "m" .. i, T0 + i)) end
	lu.assertEquals(self.db:release_all("twin " .. H .. " "), 0, "the first process at start")
	lu.assertEquals(#self.db:lease(H, "bob", "twin " .. H .. " s1", T0, T0 + 1e9, 2), 2)
	local twin = assert(core.open_postgres(self.conninfo))
	local n, err, code = twin:release_all("twin " .. H .. " ")
	lu.assertNil(n, "the twin released the live leases")
	lu.assertEquals(code, LOCK_NOT_AVAILABLE, err)
	lu.assertStrContains(err, "twin " .. H)
	lu.assertEquals(#twin:lease(H, "bob", "other", T0, T0 + 1e9), 0, "still leased")
	lu.assertEquals(twin:release_all("other-node " .. H .. " "), 0, "another node's prefix")
	lu.assertEquals(self.db:release_all("twin " .. H .. " "), 2, "the holder itself may release again")
	local elsewhere = fresh()
	lu.assertEquals(elsewhere:release_all("twin " .. H .. " "), 0, "another schema")
	elsewhere:close()
	self.db:close(); self.db = nil
	-- (the server ends the closed connection's process, and its locks, a moment later)
	local freed
	local deadline = socket.gettime() + 5
	repeat
		freed = twin:release_all("twin " .. H .. " ")
		if not freed then socket.sleep(0.05) end
	until freed or socket.gettime() > deadline
	lu.assertEquals(freed, 0, "free once its holder has gone")
	twin:close()
end

-- Three processes store, two pop the same user meanwhile: every stored message is popped once
-- or still there, none lost, none twice, each popper's stream in id order, each writer's
-- messages in the order it stored them.
function TestPostgresConcurrency:test_pop_against_stores_loses_nothing()
	local start_at, stop = socket.gettime() + 1.5, self.dir .. "/stop"
	local stores, pops = {}, {}
	for i = 1, 3 do
		stores[i] = worker("store", self.conninfo, self.dir, "store" .. i, start_at,
			{ n = 150, tag = "s" .. i, user = "bob" }) .. " &"
	end
	for i = 1, 2 do
		pops[i] = worker("pop", self.conninfo, self.dir, "pop" .. i, start_at, { user = "bob", stop = stop }) .. " &"
	end
	local res = run_workers(self.dir, { "store1", "store2", "store3", "pop1", "pop2" },
		format("( %s wait; touch %s ) & %s wait", concat(stores, " "), q(stop), concat(pops, " ")))
	local stored, seen = {}, {}
	for i = 1, 3 do
		for _, it in ipairs(res["store" .. i].ok) do stored[it.id] = it.xml end
		lu.assertEquals(#res["store" .. i].ok, 150)
	end
	local popped_total = 0
	for i = 1, 2 do
		local last, order = 0, {}
		for _, it in ipairs(res["pop" .. i].pop) do
			lu.assertTrue(it.id > last, "pop" .. i .. " returned ids out of order")
			last = it.id
			lu.assertNil(seen[it.id], "message " .. it.id .. " was popped twice")
			lu.assertEquals(it.xml, stored[it.id], "popped a message nobody stored")
			seen[it.id] = "pop" .. i
			local writer, n = it.xml:match("^(s%d):(%d+)$")
			lu.assertTrue((order[writer] or 0) < tonumber(n), "a writer's messages arrived out of order")
			order[writer] = tonumber(n)
			popped_total = popped_total + 1
		end
	end
	local remaining = assert_counter(self.db, "bob")
	for _, it in ipairs(remaining) do
		lu.assertNil(seen[it.id], "message " .. it.id .. " was popped and is still stored")
		seen[it.id] = "left"
	end
	local lost = 0
	for id in pairs(stored) do if not seen[id] then lost = lost + 1 end end
	lu.assertEquals(lost, 0, "stored - popped - remaining")
	lu.assertEquals(popped_total + #remaining, 450)
	lu.assertTrue(popped_total > 0, "the poppers ran while the writers did")
end

-- Writers on five users (some messages expiring), a popper on one, and a process running the
-- bulk deletes and remove_user in a loop: every counter stays exact, no call fails (no
-- deadlock), and stored = popped + popped-as-expired + deleted + remaining.
function TestPostgresConcurrency:test_bulk_deletes_against_stores_and_pops()
	local start_at, stop = socket.gettime() + 1.5, self.dir .. "/stop"
	local users = "u1,u2,u3,victim,u5"
	local stores = {}
	for i = 1, 2 do
		stores[i] = worker("store", self.conninfo, self.dir, "store" .. i, start_at,
			{ n = 200, tag = "b" .. i, users = users, expire_every = 3 }) .. " &"
	end
	local pop = worker("pop", self.conninfo, self.dir, "pop", start_at, { user = "u1", stop = stop }) .. " &"
	local bulk = worker("bulk", self.conninfo, self.dir, "bulk", start_at,
		{ stop = stop, now = 50, cutoff = 20, victim = "victim" }) .. " &"
	local res = run_workers(self.dir, { "store1", "store2", "pop", "bulk" },
		format("( %s wait; touch %s ) & %s %s wait", concat(stores, " "), q(stop), pop, bulk))
	local stored = #res.store1.ok + #res.store2.ok
	lu.assertEquals(stored, 400)
	local remaining = 0
	for u in users:gmatch("[^,]+") do remaining = remaining + #assert_counter(self.db, u) end
	lu.assertEquals(#res.pop.pop + res.pop.expired + res.bulk.touched + remaining, stored)
	lu.assertTrue(res.bulk.touched > 0, "the bulk deletes found work")
end

-- Several nodes starting at once on an empty schema: one creates it, all open.
function TestPostgresConcurrency:test_first_open_races()
	local conninfo = server():fresh_conninfo()
	local start_at, names, cmds = socket.gettime() + 1.0, {}, {}
	for i = 1, 4 do
		names[i] = "open" .. i
		cmds[i] = worker("open", conninfo, self.dir, names[i], start_at, { tag = "o" .. i }) .. " &"
	end
	local res = run_workers(self.dir, names, concat(cmds, " ") .. " wait")
	for _, name in ipairs(names) do lu.assertEquals(#res[name].ok, 1) end
	local db = assert(core.open_postgres(conninfo))
	lu.assertEquals(db:count(H, "bob"), 4)
	db:close()
end

---------------------------------------------------------------------------------------------------
-- Group commit: batches on several connections (backend_postgres_batch.c).
TestPostgresBatch = {}

function TestPostgresBatch:setUp()
	self.db, self.conninfo, self.schema = fresh()
	self.dir = support.tmpdir()
end

function TestPostgresBatch:tearDown()
	if self.db then self.db:close() end
	if self.dir then support.rmrf(self.dir) end
end

local function xmls(items)
	local r = {}
	for i, it in ipairs(items) do r[i] = it.xml end
	return r
end

-- Starts a worker "b" that stores (opts) in self.dir, once it stored its first message lets it
-- go on; returns the deadline for it to finish.
local function start_worker(self, opts)
	local dir = self.dir
	opts.ready, opts.go = dir .. "/ready", dir .. "/go"
	assert(support.exec(worker("store", self.conninfo, dir, "b", 0, opts) .. " &"))
	local deadline = socket.gettime() + 20
	while not support.read(dir .. "/ready") do
		assert(socket.gettime() < deadline, "the worker did not start")
		socket.sleep(0.01)
	end
	support.write(dir .. "/go", "")
	return deadline
end

-- What the worker wrote, once it is done.
local function worker_output(self, deadline)
	local out
	repeat
		out = support.read(self.dir .. "/b") or ""
		assert(socket.gettime() < deadline, "the worker did not finish: " .. out)
		if not out:find("done") then socket.sleep(0.01) end
	until out:find("done")
	return out
end

local function deadlocks(srv)
	return tonumber(srv:psql("SELECT pg_stat_force_next_flush(); SELECT sum(deadlocks) FROM pg_stat_database"):match("(%d+)%s*$"))
end

-- After two batches that took u1 and u2 (this one's ids, the worker's output): u1 and u2 hold
-- two rows each, every one with the id its store was told (after storing again too), and
-- PostgreSQL counted `more` deadlocks than `before`.
local function both_committed(self, ids, out, before, more)
	for id, xml in out:gmatch("ok (%d+) (%S+)") do ids[tonumber(id)] = xml end
	for _, u in ipairs({ "u1", "u2" }) do
		local items = assert_counter(self.db, u)
		lu.assertEquals(#items, 2, u)
		for _, it in ipairs(items) do lu.assertEquals(ids[it.id], it.xml, "the ids told are the rows' ids") end
	end
	self.db:close() -- (a session's statistics are written at its end at the latest)
	self.db = assert(core.open_postgres(self.conninfo))
	local deadline = socket.gettime() + (more > 0 and 10 or 1)
	while deadlocks(server()) == before and socket.gettime() < deadline do socket.sleep(0.05) end
	lu.assertEquals(deadlocks(server()), before + more, "deadlocks PostgreSQL saw")
end

-- From now on the server refuses a stanza of 10 bytes or more (SQLSTATE 23514).
local function refuse_long_stanzas(schema)
	server():psql(format("ALTER TABLE %s.offline_message ADD CONSTRAINT short CHECK (octet_length(stanza) < 10)", schema))
end


-- Two batches take two users' queue rows in opposite orders: PostgreSQL aborts one of them
-- (40P01); that one stores its batch again with the same ids, and both commit everything.
function TestPostgresBatch:test_opposite_orders_deadlock_and_both_commit()
	local db = self.db
	local before = deadlocks(server())
	assert(db:begin())
	local c1, id1 = db:store(H, "u1", FROM, "a:1", T0)
	lu.assertEquals(c1, 1)
	local deadline = start_worker(self, { n = 2, batch = 2, users = "u2,u1", tag = "b" })
	-- blocks on the worker's lock of u2 while the worker waits for ours of u1
	local c2, id2 = db:store(H, "u2", FROM, "a:2", T0)
	-- (2 when this batch was the one aborted: stored again after the other's commit)
	lu.assertTrue(c2 == 1 or c2 == 2, "u2: " .. tostring(c2) .. " " .. tostring(id2))
	lu.assertTrue(db:commit())
	local out = worker_output(self, deadline)
	lu.assertNotStrContains(out, "fail")
	lu.assertNotStrContains(out, "lost")
	local ids = { [id1] = "a:1", [id2] = "a:2" }
	both_committed(self, ids, out, before, 1)
end

-- The batch that waited first is the one PostgreSQL aborts. Stored again, its first message
-- no longer fits (the other batch filled the queue meanwhile): it cannot keep what it said,
-- so the whole batch fails (40P01) and nothing of it stays; the other commits.
function TestPostgresBatch:test_a_batch_that_comes_out_otherwise_fails_whole()
	local db, srv = self.db, server()
	assert(db:begin())
	lu.assertEquals(db:store(H, "u1", FROM, "a:1", T0), 1)
	local deadline = start_worker(self, { n = 2, batch = 2, max = 1, users = "u2,u1", tag = "b" })
	-- the worker's store to u1 waits for this batch's lock
	while tonumber(srv:psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")) == 0 do
		assert(socket.gettime() < deadline, "the worker never waited")
		socket.sleep(0.01)
	end
	lu.assertEquals(db:store(H, "u2", FROM, "a:2", T0), 1)
	lu.assertTrue(db:commit())
	local out = worker_output(self, deadline)
	lu.assertStrContains(out, "lost 1", "the worker's batch failed as a whole")
	lu.assertNotStrContains(out, "ok ")
	lu.assertEquals(xmls(assert_counter(db, "u1")), { "a:1" })
	lu.assertEquals(xmls(assert_counter(db, "u2")), { "a:2" })
end

-- Four nodes store in batches of 10 to three users, two in one order and two in the other
-- (two of them pipelined, one of each order), with a limit of 40 each: deadlocks are settled, every limit is exact, every id handed
-- out for a committed batch is a row, and no other row exists.
function TestPostgresBatch:test_concurrent_batches_keep_limits_exact()
	local start_at, names, cmds = socket.gettime() + 1.5, {}, {}
	for i = 1, 4 do
		names[i] = "batch" .. i
		cmds[i] = worker("store", self.conninfo, self.dir, names[i], start_at,
			{ n = 90, max = 40, batch = 10, tag = "p" .. i, users = i % 2 == 0 and "a,b,c" or "c,b,a",
			  send = i <= 2 and 1 or nil }) .. " &"
	end
	local res = run_workers(self.dir, names, concat(cmds, " ") .. " wait")
	local ids, lost = {}, 0
	for _, name in ipairs(names) do
		lost = lost + res[name].lost
		for _, it in ipairs(res[name].ok) do
			lu.assertNil(ids[it.id], "an id was handed out twice")
			ids[it.id] = it.xml
		end
	end
	local rows = 0
	for _, u in ipairs({ "a", "b", "c" }) do
		local items = assert_counter(self.db, u)
		lu.assertTrue(#items <= 40, u .. " over its limit")
		if lost == 0 then lu.assertEquals(#items, 40, u) end
		for _, it in ipairs(items) do lu.assertEquals(ids[it.id], it.xml, "a row nobody was told of") end
		rows = rows + #items
	end
	local told = 0
	for _ in pairs(ids) do told = told + 1 end
	lu.assertEquals(told, rows, "a committed store whose row is missing")
end

-- Inside a batch: the limit counts the batch's own stores, drop_oldest evicts the batch's own
-- rows and committed ones, a rollback leaves the counters as they were; another node sees
-- nothing before the commit.
function TestPostgresBatch:test_batch_limits_eviction_and_isolation()
	local db = self.db
	local other = assert(core.open_postgres(self.conninfo))
	lu.assertEquals(db:store(H, "bob", FROM, "old", T0), 1)
	assert(db:begin())
	lu.assertEquals(db:store(H, "bob", FROM, "in1", T0, nil, 3), 2)
	lu.assertEquals(db:store(H, "bob", FROM, "in2", T0, nil, 3), 3)
	lu.assertEquals({ db:store(H, "bob", FROM, "no", T0, nil, 3) }, { false, "limit", 3 })
	local c, _, evicted = db:store(H, "bob", FROM, "in3", T0, nil, 3, nil, nil, nil, true)
	lu.assertEquals({ c, evicted }, { 3, 1 })
	lu.assertEquals({ other:count(H, "bob") }, { 1, 3 }, "not visible before the commit")
	lu.assertTrue(db:commit())
	lu.assertEquals(xmls(assert_counter(other, "bob")), { "in1", "in2", "in3" })
	assert(db:begin())
	lu.assertEquals(db:store(H, "bob", FROM, "gone", T0, nil, nil, nil, nil, nil, true), 4)
	lu.assertEquals(db:store(H, "carol", FROM, "gone", T0), 1)
	lu.assertTrue(db:rollback())
	lu.assertEquals(xmls(assert_counter(other, "bob")), { "in1", "in2", "in3" })
	lu.assertEquals({ other:count(H, "carol") }, { 0, 0 })
	other:close()
end

-- A store that fails inside a batch rolls the whole batch back.
function TestPostgresBatch:test_failed_store_ends_the_batch()
	local db = self.db
	refuse_long_stanzas(self.schema)
	assert(db:begin())
	lu.assertEquals(db:store(H, "bob", FROM, "m1", T0), 1)
	local c, err = db:store(H, "bob", FROM, "far too long", T0)
	lu.assertNil(c)
	lu.assertStrContains(err, "23514")
	lu.assertTrue(db:commit(), "nothing left to commit")
	lu.assertEquals({ db:count(H, "bob") }, { 0, 0 }, "the batch's earlier store is gone too")
end

-- Pipelined stores (db:send): the same decisions as stores made at once, read at the commit.
local function outcomes(db, n)
	local r = {}
	for i = 1, n do r[i] = { db:outcome(i) } end
	return r
end

-- One sequence of stores, made at once on one schema and sent on another: the outcomes are
-- the same (limit by count and by bytes, a duplicate inside the batch and one committed before,
-- several users), another connection sees none of it before the commit.
function TestPostgresBatch:test_sends_decide_as_stores_do()
	local piped, conninfo = fresh()
	local other = assert(core.open_postgres(conninfo))
	local seq = {
		{ "bob", "m1", nil, nil, "k1" }, { "carol", "c1" }, { "bob", "m2", 3 }, { "bob", "m1 again", nil, nil, "k1" },
		{ "bob", "m3", 3 }, { "bob", "over", 3 }, { "carol", "c2", nil, 6 }, { "carol", "c3 too big", nil, 6 },
		{ "dave", "old", nil, nil, "k0" }, { "bob", "m4" },
	}
	lu.assertEquals(self.db:store(H, "dave", FROM, "d0", T0, nil, nil, nil, nil, "k0"), 1)
	lu.assertEquals(piped:store(H, "dave", FROM, "d0", T0, nil, nil, nil, nil, "k0"), 1)
	local at_once = {}
	assert(self.db:begin())
	for i, m in ipairs(seq) do at_once[i] = { self.db:store(H, m[1], FROM, m[2], T0 + i, nil, m[3], m[4], nil, m[5]) } end
	assert(self.db:commit())
	assert(piped:begin())
	for i, m in ipairs(seq) do
		lu.assertEquals({ piped:send(H, m[1], FROM, m[2], T0 + i, nil, m[3], m[4], nil, m[5]) }, { true })
	end
	lu.assertErrorMsgContains("no such send", piped.outcome, piped, 1)
	lu.assertEquals({ other:count(H, "bob") }, { 0, 0 }, "not visible before the commit")
	assert(piped:commit())
	local got = outcomes(piped, #seq)
	lu.assertEquals(#got, #seq)
	-- (ids may differ: a batch that gives way sends again by user; the rows below check them)
	for i = 1, #seq do
		lu.assertEquals(got[i][1], at_once[i][1], "outcome " .. i)
		if got[i][1] == false then lu.assertEquals(got[i], at_once[i], "outcome " .. i) end
	end
	lu.assertEquals(got[6], { false, "limit", 3 })
	lu.assertEquals(got[4], { false, "duplicate", 2 })
	lu.assertEquals(got[9], { false, "duplicate", 1 })
	lu.assertEquals(xmls(assert_counter(other, "bob")), { "m1", "m2", "m3", "m4" })
	local ids = {}
	for _, it in ipairs(assert_counter(other, "bob")) do ids[#ids + 1] = it.id end
	lu.assertEquals(ids, { got[1][2], got[3][2], got[5][2], got[10][2] }, "the ids told are the rows'")
	lu.assertErrorMsgContains("no such send", piped.outcome, piped, #seq + 1)
	assert(piped:begin())
	lu.assertErrorMsgContains("no such send", piped.outcome, piped, 1) -- (a new batch forgets them)
	assert(piped:rollback())
	piped:close()
	other:close()
end

-- db:send is for a batch on a backend that pipelines; eviction is not pipelined.
function TestPostgresBatch:test_send_only_in_a_batch()
	lu.assertEquals({ self.db:send(H, "bob", FROM, "x", T0) }, { false, "no batch" })
	assert(self.db:begin())
	lu.assertErrorMsgContains("eviction is not pipelined", self.db.send, self.db, H, "bob", FROM, "x", T0,
		nil, 1, nil, nil, nil, true)
	assert(self.db:rollback())
	local sq = assert(core.open_sqlite(self.dir .. "/s.sqlite"))
	assert(sq:begin())
	lu.assertEquals({ sq:send(H, "bob", FROM, "x", T0) }, { false, "not pipelined" })
	assert(sq:commit())
	lu.assertEquals({ sq:count(H, "bob") }, { 0, 0 })
	sq:close()
	lu.assertEquals({ self.db:count(H, "bob") }, { 0, 0 })
end

-- A store made at once (eviction) after sends reads their outcomes first: the limit counts
-- them, and their outcomes are kept for the commit; a rollback discards everything.
function TestPostgresBatch:test_store_after_sends_and_rollback()
	local db = self.db
	assert(db:begin())
	for i = 1, 3 do lu.assertTrue(db:send(H, "bob", FROM, "s" .. i, T0, nil, 3)) end
	local c, _, evicted = db:store(H, "bob", FROM, "e", T0, nil, 3, nil, nil, nil, true)
	lu.assertEquals({ c, evicted }, { 3, 1 })
	lu.assertTrue(db:send(H, "bob", FROM, "s4", T0, nil, 3))
	assert(db:commit())
	local got = outcomes(db, 4)
	lu.assertEquals({ got[1][1], got[2][1], got[3][1] }, { 1, 2, 3 })
	lu.assertEquals(got[4], { false, "limit", 3 })
	lu.assertEquals(xmls(assert_counter(db, "bob")), { "s2", "s3", "e" })
	assert(db:begin())
	for i = 1, 3 do lu.assertTrue(db:send(H, "carol", FROM, "r" .. i, T0)) end
	assert(db:rollback())
	lu.assertErrorMsgContains("no such send", db.outcome, db, 1)
	lu.assertEquals({ db:count(H, "carol") }, { 0, 0 })
	assert(db:begin())
	lu.assertTrue(db:send(H, "carol", FROM, "after", T0))
	assert(db:commit())
	lu.assertEquals((db:outcome(1)), 1)
end

-- A send meets another writer's copy of its dedup key (the other's transaction was open when
-- it ran): the commit stores the batch again, inside the batch (its evicting store included:
-- nothing is committed half-way), and the send comes out a duplicate.
function TestPostgresBatch:test_send_meeting_a_key_being_written_is_a_duplicate()
	local db = self.db
	lu.assertEquals(db:store(H, "ev", FROM, "ev-old", T0), 1)
	-- the worker stores to bob with the key "k:1" in a batch, and commits 0.5 s after go
	local deadline = start_worker(self, { n = 1, batch = 1, users = "bob", tag = "theirs", dedup = "k", hold = 0.5 })
	assert(db:begin())
	local c, _, evicted = db:store(H, "ev", FROM, "ev-new", T0, nil, 1, nil, nil, nil, true)
	lu.assertEquals({ c, evicted }, { 1, 1 })
	lu.assertTrue(db:send(H, "bob", FROM, "ours", T0, nil, nil, nil, nil, "k:1"))
	lu.assertTrue(db:send(H, "carol", FROM, "c1", T0))
	lu.assertTrue(db:commit()) -- (bob's store waits for the worker's row, then meets its key)
	lu.assertStrContains(worker_output(self, deadline), "ok ")
	lu.assertEquals({ db:outcome(1) }, { false, "duplicate", 1 })
	lu.assertEquals((db:outcome(2)), 1)
	lu.assertEquals(xmls(assert_counter(db, "bob")), { "theirs:1" })
	lu.assertEquals(xmls(assert_counter(db, "ev")), { "ev-new" })
	lu.assertEquals(xmls(assert_counter(db, "carol")), { "c1" })
	lu.assertEquals(server():psql(format("SELECT count(DISTINCT xmin::text) FROM %s.offline_message "
		.. "WHERE username <> convert_to('bob', 'UTF8')", self.schema)), "1", "ev-new and c1 in one transaction")
end

-- A send that fails on the server fails the commit: nothing of the batch stays, and the next
-- batch works (the connection left pipeline mode).
function TestPostgresBatch:test_failed_send_fails_the_commit()
	local db = self.db
	refuse_long_stanzas(self.schema)
	assert(db:begin())
	lu.assertTrue(db:send(H, "bob", FROM, "m1", T0))
	lu.assertTrue(db:send(H, "bob", FROM, "far too long", T0), "(its outcome is not known yet)")
	lu.assertTrue(db:send(H, "bob", FROM, "m3", T0))
	local ok, err = db:commit()
	lu.assertNil(ok)
	lu.assertStrContains(err, "23514")
	lu.assertErrorMsgContains("no such send", db.outcome, db, 1)
	lu.assertEquals({ db:count(H, "bob") }, { 0, 0 }, "nothing of the batch stays")
	assert(db:begin())
	lu.assertTrue(db:send(H, "bob", FROM, "m4", T0))
	lu.assertEquals(db:store(H, "bob", FROM, "m5", T0), 2)
	assert(db:commit())
	lu.assertEquals(xmls(assert_counter(db, "bob")), { "m4", "m5" })
end

-- Pipelined batches never deadlock: where stores made at once do (the test above), a send
-- kept waiting gives way instead, and its batch stores again in lock order; both commit
-- everything.
function TestPostgresBatch:test_pipelined_batches_take_rows_in_one_order()
	local db = self.db
	local before = deadlocks(server())
	assert(db:begin())
	lu.assertTrue(db:send(H, "u1", FROM, "a:1", T0))
	lu.assertEquals(db:store(H, "u0", FROM, "a:0", T0), 1) -- (reads the send: u1 is locked now)
	local deadline = start_worker(self, { n = 2, batch = 2, send = 1, users = "u2,u1", tag = "b" })
	local srv = server()
	-- the worker's sends (u2, then u1) go out at once; u1 waits, gives way after 10 ms, and
	-- the batch stores again in lock order: u1 first, where it waits holding nothing
	while tonumber(srv:psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")) == 0 do
		assert(socket.gettime() < deadline, "the worker never waited")
		socket.sleep(0.01)
	end
	lu.assertTrue(db:send(H, "u2", FROM, "a:2", T0)) -- (u2 is free: the worker holds nothing yet)
	lu.assertTrue(db:commit())
	local out = worker_output(self, deadline)
	lu.assertNotStrContains(out, "fail")
	lu.assertNotStrContains(out, "lost")
	local _, id1 = db:outcome(1)
	local _, id2 = db:outcome(2)
	local ids = { [id1] = "a:1", [id2] = "a:2" }
	both_committed(self, ids, out, before, 0)
end

-- Sessions of this module in a transaction that has an id (a batch that has begun).
local function batches_begun(srv)
	return tonumber(srv:psql("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
		.. "WHERE l.locktype = 'transactionid' AND a.application_name = 'prosody-offline-store'"))
end

local function lock_timeouts(srv)
	return select(2, srv:log():gsub("canceling statement due to lock timeout", ""))
end

-- A send kept waiting for a user's row (another batch holds it) gives way after 10 ms: its
-- batch rolls back and stores everything again in lock order, waiting this time, and commits
-- what it was told. The batches after it hold their sends back until their commit.
function TestPostgresBatch:test_a_send_kept_waiting_gives_way()
	local db, srv = self.db, server()
	local timeouts = lock_timeouts(srv)
	local deadline = start_worker(self, { n = 1, batch = 1, users = "bob", tag = "theirs", hold = 0.5 })
	assert(db:begin())
	lu.assertTrue(db:send(H, "carol", FROM, "c1", T0))
	while batches_begun(srv) < 2 do -- (the worker's and this one: the send went out at once)
		assert(socket.gettime() < deadline, "the send did not go out")
		socket.sleep(0.01)
	end
	lu.assertTrue(db:send(H, "bob", FROM, "ours", T0))
	lu.assertTrue(db:send(H, "alice", FROM, "a1", T0))
	local started = socket.gettime()
	lu.assertTrue(db:commit())
	lu.assertTrue(socket.gettime() - started > 0.2, "the batch stored again waited for the worker's commit")
	lu.assertStrContains(worker_output(self, deadline), "ok ")
	lu.assertEquals({ (db:outcome(1)), (db:outcome(2)), (db:outcome(3)) }, { 1, 2, 1 })
	lu.assertEquals(xmls(assert_counter(db, "bob")), { "theirs:1", "ours" })
	lu.assertEquals(xmls(assert_counter(db, "carol")), { "c1" })
	lu.assertEquals(xmls(assert_counter(db, "alice")), { "a1" })
	lu.assertEquals(lock_timeouts(srv), timeouts + 1, "bob's send gave way")
	-- the next batch holds its sends back: nothing has begun when its commit comes
	assert(db:begin())
	lu.assertTrue(db:send(H, "bob", FROM, "later", T0))
	lu.assertTrue(db:send(H, "alice", FROM, "a2", T0))
	socket.sleep(0.05)
	lu.assertEquals(batches_begun(srv), 0, "the sends were held back")
	lu.assertTrue(db:commit())
	lu.assertEquals({ (db:outcome(1)), (db:outcome(2)) }, { 3, 2 })
end

---------------------------------------------------------------------------------------------------
TestPostgresConnection = {}

function TestPostgresConnection:setUp()
	self.srv = server()
	self.db, self.conninfo, self.schema = fresh()
end

function TestPostgresConnection:tearDown()
	if self.db then self.db:close() end
	-- whatever a test did, leave the shared server running
	if self.srv and not self.srv:running() then self.srv:start() end
end

-- Keeps storing until a call succeeds (the server is coming back); returns what happened.
local function store_until_ok(db, user, xml, deadline)
	local failures = {}
	while socket.gettime() < deadline do
		local count, id, code = db:store(H, user, FROM, xml, T0)
		if count then return count, failures end
		lu.assertNil(count, "a store over no limit never says limit")
		failures[#failures + 1] = { msg = id, code = code }
		socket.sleep(0.05)
	end
	error("the store did not reconnect: " .. tostring(failures[#failures] and failures[#failures].msg))
end

-- A store blocked on the user's row lock (held by another session) when PostgreSQL restarts:
-- that call fails with the fail triple, nothing of it is written, the backend reconnects.
-- The session dies with sends in flight: the commit fails, nothing of the batch stays, and the
-- next batch works on a new connection (libpq's pipeline mode did not outlive the old one).
function TestPostgresConnection:test_session_killed_with_sends_in_flight()
	local srv, db = self.srv, self.db
	assert(db:begin())
	for i = 1, 3 do lu.assertTrue(db:send(H, "bob", FROM, "s" .. i, T0)) end
	srv:psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'prosody-offline-store'")
	local ok, err = db:commit()
	lu.assertNil(ok)
	lu.assertNotNil(err)
	lu.assertEquals(srv:psql(format("SELECT count(*) FROM %s.offline_message", self.schema)), "0")
	local deadline = socket.gettime() + 30
	while not db:begin() do
		assert(socket.gettime() < deadline, "no new batch after the session died")
		socket.sleep(0.05)
	end
	lu.assertTrue(db:send(H, "bob", FROM, "after", T0))
	lu.assertTrue(db:commit())
	lu.assertEquals((db:outcome(1)), 1)
	lu.assertEquals(xmls(assert_counter(db, "bob")), { "after" })
end

function TestPostgresConnection:test_restart_under_a_call_in_flight()
	local srv, db = self.srv, self.db
	lu.assertEquals(db:store(H, "bob", FROM, "before", T0), 1)
	-- Another session holds bob's queue row for a while; then the server restarts.
	local holder = format("%s/psql -X -q -h %s -p %d -U postgres -d %s -c %s >/dev/null 2>&1 &", q(srv.bin),
		q(srv.dir), srv.port, srv.db, q(format("BEGIN; SELECT * FROM %s.offline_queue FOR UPDATE; "
		.. "SELECT pg_sleep(20); COMMIT", self.schema)))
	assert(support.exec(holder))
	local deadline = socket.gettime() + 10
	while srv:psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'") ~= "1" do
		assert(socket.gettime() < deadline, "the lock holder did not start")
		socket.sleep(0.05)
	end
	-- the restart comes once the store below waits for bob's row (a fixed delay was not
	-- enough on a loaded machine: the store could start after the restart was over)
	assert(support.exec(srv:restart_when(
		"SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock'", 15)))
	local started = socket.gettime()
	local count, msg, code = db:store(H, "bob", FROM, "in flight", T0)
	lu.assertNil(count, "the call in flight fails; " .. srv:restart_output())
	lu.assertEquals(code, 0, "connection-level failures have code 0")
	lu.assertStrContains(msg, "lost the connection to PostgreSQL")
	lu.assertTrue(socket.gettime() - started < 15, "it failed when the server went away, not after the holder")
	local n = store_until_ok(db, "bob", "after", socket.gettime() + 30)
	lu.assertEquals(n, 2, "before + after; the call in flight wrote nothing")
	local items = assert_counter(db, "bob")
	lu.assertEquals({ items[1].xml, items[2].xml }, { "before", "after" })
	lu.assertEquals(#db:pop(H, "bob", T0), 2)
end

-- Restarted between calls: the next call notices the closed connection before sending and
-- reconnects, so it succeeds (fast and immediate shutdowns alike).
function TestPostgresConnection:test_restart_between_calls_is_invisible()
	local srv, db = self.srv, self.db
	lu.assertEquals(db:store(H, "bob", FROM, "one", T0), 1)
	srv:restart("fast")
	socket.sleep(0.1) -- let the goodbye reach the client socket
	lu.assertEquals(db:store(H, "bob", FROM, "two", T0), 2)
	srv:restart("immediate")
	socket.sleep(0.1)
	lu.assertEquals(db:count(H, "bob"), 2)
	assert_counter(db, "bob")
end

-- A store loop across a restart: successes before and after, failures only as fail triples,
-- and afterwards every success is stored, nothing half-written, the counter exact.
function TestPostgresConnection:test_store_loop_across_a_restart()
	local srv, db = self.srv, self.db
	assert(support.exec(srv:restart_later(0.3, "immediate")))
	local deadline, ok_xml, failed, after_failure = socket.gettime() + 30, {}, 0, 0
	local i = 0
	while socket.gettime() < deadline do
		i = i + 1
		local count, msg, code = db:store(H, "bob", FROM, "loop" .. i, T0)
		if count then
			ok_xml["loop" .. i] = true
			if failed > 0 then after_failure = after_failure + 1 end
		else
			lu.assertNil(count)
			lu.assertEquals(code, 0, msg)
			failed = failed + 1
		end
		if after_failure >= 20 then break end
		socket.sleep(0.01)
	end
	lu.assertTrue(failed > 0, "the restart was noticed")
	lu.assertTrue(after_failure >= 20, "stores succeed again after the restart")
	local items = assert_counter(db, "bob")
	local present = {}
	for _, it in ipairs(items) do present[it.xml] = true end
	for xml in pairs(ok_xml) do lu.assertTrue(present[xml], xml .. " was acknowledged but is missing") end
	-- Only a call on the wire when the server died can have been committed and reported failed.
	local acknowledged = 0
	for _ in pairs(ok_xml) do acknowledged = acknowledged + 1 end
	lu.assertTrue(#items - acknowledged <= 1, "at most the call in flight is in doubt")
end

-- Server down: calls fail at once with code 0; after it is back, calls succeed (the backoff
-- between reconnection attempts is at most 8 s and starts at 250 ms).
function TestPostgresConnection:test_server_down_then_back()
	local srv, db = self.srv, self.db
	lu.assertEquals(db:store(H, "bob", FROM, "one", T0), 1)
	srv:stop("fast")
	local count, msg, code = db:count(H, "bob")
	lu.assertNil(count)
	lu.assertEquals(code, 0)
	lu.assertStrContains(msg, "PostgreSQL is unreachable")
	local started = socket.gettime()
	count, msg, code = db:store(H, "bob", FROM, "two", T0)
	lu.assertNil(count)
	lu.assertEquals(code, 0)
	lu.assertStrContains(msg, "next reconnection attempt")
	lu.assertTrue(socket.gettime() - started < 0.1, "no reconnection attempt within the backoff")
	srv:start()
	lu.assertEquals(store_until_ok(db, "bob", "three", socket.gettime() + 30), 2)
	assert_counter(db, "bob")
end

-- PostgreSQL behind a network gone silent (spec/support/pg_proxy.lua drops the connections,
-- then accepts new ones and never answers): no call waits for it. Each call fails within a
-- few ms with code 0 (the reconnection attempt goes on in the background of the calls,
-- gives up after connect_timeout, then the backoff), pops leave the queue alone, a store
-- opened meanwhile opens without waiting; once the network is back, calls succeed again on
-- the same handles. (The bound is what "does not wait" means, not a performance figure.)
function TestPostgresConnection:test_calls_while_unreachable_do_not_wait()
	local proxy = self.srv:proxy()
	local conninfo = proxy:conninfo(self.conninfo)
	local db = assert(core.open_postgres(conninfo))
	local ok, err = pcall(function()
		lu.assertEquals(db:store(H, "bob", FROM, "before", T0), 1)
		proxy:blackhole(true)
		local started = socket.gettime()
		local late = assert(core.open_postgres(conninfo), "opened while unreachable")
		lu.assertTrue(socket.gettime() - started < 0.5, "open waited for the network")
		local seen = {}
		for i = 1, 20 do
			for _, call in ipairs {
				function() return db:store(H, "bob", FROM, "during" .. i, T0) end,
				function() return db:pop(H, "bob", T0) end,
				function() return late:count(H, "bob") end,
			} do
				local t = socket.gettime()
				local r, msg, code = call()
				local took = socket.gettime() - t
				lu.assertNil(r, "succeeded while unreachable")
				lu.assertEquals(code, 0, msg)
				lu.assertStrContains(msg, "PostgreSQL is unreachable")
				lu.assertTrue(took < 0.1, format("call %d took %.3f s: %s", i, took, msg))
				seen[msg:match("^PostgreSQL is unreachable %((%a+)")] = true
			end
			socket.sleep(0.15) -- 20 rounds: past connect_timeout (2 s), so an attempt gives up
		end
		lu.assertTrue(proxy:held() >= 1, "reconnection attempts were really held unanswered")
		lu.assertTrue(seen.connecting, "calls found an attempt under way")
		lu.assertTrue(seen.next or seen.reconnecting, "an attempt gave up (then the backoff)")
		proxy:blackhole(false)
		lu.assertEquals(store_until_ok(db, "bob", "after", socket.gettime() + 30), 2)
		local items = assert(db:pop(H, "bob", T0))
		lu.assertEquals({ items[1].xml, items[2].xml }, { "before", "after" }, "the pops took nothing")
		lu.assertEquals(store_until_ok(late, "bob", "late", socket.gettime() + 30), 1, "the late store works")
		late:close()
	end)
	db:close()
	proxy:stop()
	assert(ok, err)
end

-- A pop whose emit raises in the middle (out of memory, from the allocator of
-- build/alloc_fault.so) rolls back at once: the user's row lock is free, so another
-- connection's store to that user goes through at once (its lock_timeout of 2 s makes this
-- fail instead of hang were the lock still held), and the queue is intact.
function TestPostgresConnection:test_pop_abandoned_by_an_emit_releases_its_locks()
	local db = self.db
	local fail_over = alloc_fault()
	lu.assertEquals(db:store(H, "bob", FROM, "small", T0), 1)
	lu.assertEquals(db:store(H, "bob", FROM, string.rep("x", 100000), T0), 2)
	fail_over(65536)
	local ok, err = pcall(db.pop, db, H, "bob", T0)
	fail_over(nil)
	lu.assertFalse(ok, "the emit raised")
	lu.assertStrContains(tostring(err), "not enough memory")
	local other = assert(core.open_postgres((self.conninfo:gsub("options='", "options='-clock_timeout=2000 "))))
	local started = socket.gettime()
	local count, msg = other:store(H, "bob", FROM, "meanwhile", T0)
	local took = socket.gettime() - started
	other:close()
	lu.assertEquals(count, 3, "the other connection stored: " .. tostring(msg))
	lu.assertTrue(took < 1, "it did not wait for the lock")
	local items = assert(db:pop(H, "bob", T0))
	lu.assertEquals(#items, 3, "nothing was taken by the abandoned pop")
end

-- A server error that is not about the connection: the SQLSTATE, as tonumber(state, 36).
function TestPostgresConnection:test_server_errors_carry_the_sqlstate()
	local db = self.db
	self.srv:psql(format("DROP TABLE %s.offline_queue", self.schema))
	local count, msg, code = db:count(H, "bob")
	lu.assertNil(count)
	lu.assertStrContains(msg, "offline_queue")
	lu.assertStrContains(msg, "SQLSTATE 42P01")
	lu.assertEquals(code, tonumber("42P01", 36))
	local ok, why, c2 = db:store(H, "bob", FROM, "x", T0)
	lu.assertNil(ok)
	lu.assertStrContains(why, "42P01")
	lu.assertEquals(c2, tonumber("42P01", 36))
end

---------------------------------------------------------------------------------------------------
-- A COMMIT whose answer is lost with the connection (spec/support/pg_proxy.lua drops it right
-- after forwarding COMMIT, or instead of forwarding it): the call learns what the server did
-- before it answers. A pop that committed returns the messages (the caller delivers them); one
-- that did not fails and leaves them stored. Never lost, never reported failed when done.
TestPostgresInDoubt = {}

function TestPostgresInDoubt:setUp()
	self.srv = server()
	self.proxy = self.srv:proxy()
	self.dir = self.proxy.dir
	local conninfo, schema = self.srv:fresh_conninfo()
	self.schema = schema
	self.db = assert(core.open_postgres(self.proxy:conninfo(conninfo)))
end

function TestPostgresInDoubt:tearDown()
	if self.db then self.db:close() end
	if self.proxy then self.proxy:stop() end
end

-- Arms the proxy for the next COMMIT; returns a function that asserts it fired.
function TestPostgresInDoubt:arm(mode)
	support.write(self.dir .. "/arm", mode)
	return function()
		lu.assertEquals(support.read(self.dir .. "/fired"), mode, "the proxy dropped the COMMIT")
		os.remove(self.dir .. "/fired")
	end
end

-- Rows of bob in the database, asked directly (not through the store under test).
function TestPostgresInDoubt:stored()
	return tonumber(self.srv:psql(format("SELECT count(*) FROM %s.offline_message", self.schema)))
end

function TestPostgresInDoubt:fill(n)
	for i = 1, n do lu.assertEquals(self.db:store(H, "bob", FROM, "m" .. i, T0), i) end
end

function TestPostgresInDoubt:test_pop_committed_but_answer_lost_returns_the_messages()
	self:fill(3)
	local fired = self:arm("after")
	local items, err, code = self.db:pop(H, "bob", T0)
	fired()
	lu.assertEquals(self:stored(), 0, "the server committed the pop")
	lu.assertNotNil(items, "the pop took effect, so it must not say it failed (the messages would be lost): "
		.. tostring(err) .. " " .. tostring(code))
	lu.assertEquals({ items[1].xml, items[2].xml, items[3].xml }, { "m1", "m2", "m3" })
	-- the store goes on: the counter was deleted with the rows, new messages queue afresh
	lu.assertEquals(self.db:store(H, "bob", FROM, "later", T0), 1)
	lu.assertEquals(#assert_counter(self.db, "bob"), 1)
end

function TestPostgresInDoubt:test_pop_whose_commit_never_arrived_fails_and_keeps_them()
	self:fill(3)
	local fired = self:arm("before")
	local items, err, code = self.db:pop(H, "bob", T0)
	fired()
	lu.assertNil(items, "the pop did not take effect")
	lu.assertEquals(code, 0)
	lu.assertStrContains(err, "rolled back")
	lu.assertEquals(self:stored(), 3, "the messages stay stored")
	local again = assert(self.db:pop(H, "bob", T0))
	lu.assertEquals(#again, 3)
	lu.assertEquals(self:stored(), 0)
end

-- The old session still holds its transaction open (its client vanished without a word): the
-- store ends it (same role), and then knows it was rolled back.
function TestPostgresInDoubt:test_pop_whose_old_session_lingers_fails_and_keeps_them()
	self:fill(2)
	local fired = self:arm("hold")
	local started = socket.gettime()
	local items, err = self.db:pop(H, "bob", T0)
	fired()
	lu.assertNil(items)
	lu.assertStrContains(err, "rolled back")
	lu.assertTrue(socket.gettime() - started < 3, "resolved in good time")
	lu.assertEquals(self:stored(), 2)
	lu.assertEquals(#assert(self.db:pop(H, "bob", T0)), 2)
end

function TestPostgresInDoubt:test_remove_user_committed_but_answer_lost_counts_them()
	self:fill(2)
	local fired = self:arm("after")
	local n, err = self.db:remove_user(H, "bob")
	fired()
	lu.assertEquals(self:stored(), 0)
	lu.assertEquals(n, 2, tostring(err))
	self:fill(1)
	fired = self:arm("before")
	n, err = self.db:remove_user(H, "bob")
	fired()
	lu.assertNil(n)
	lu.assertStrContains(err, "rolled back")
	lu.assertEquals(self:stored(), 1)
end

-- A batch's COMMIT in doubt is resolved by its transaction id before anyone is told.
function TestPostgresInDoubt:test_batch_committed_but_answer_lost_succeeds()
	assert(self.db:begin())
	for i = 1, 3 do lu.assertEquals(self.db:store(H, "bob", FROM, "b" .. i, T0), i) end
	local fired = self:arm("after")
	local ok, err = self.db:commit()
	fired()
	lu.assertTrue(ok, tostring(err))
	lu.assertEquals(self:stored(), 3)
end

function TestPostgresInDoubt:test_pipelined_batch_committed_but_answer_lost_succeeds()
	assert(self.db:begin())
	for i = 1, 3 do lu.assertTrue(self.db:send(H, "bob", FROM, "b" .. i, T0, nil, 2)) end
	local fired = self:arm("after")
	local ok, err = self.db:commit()
	fired()
	lu.assertTrue(ok, tostring(err))
	lu.assertEquals({ (self.db:outcome(1)), (self.db:outcome(2)) }, { 1, 2 })
	lu.assertEquals({ self.db:outcome(3) }, { false, "limit", 2 })
	lu.assertEquals(self:stored(), 2)
end

function TestPostgresInDoubt:test_pipelined_batch_whose_commit_never_arrived_fails()
	assert(self.db:begin())
	for i = 1, 3 do lu.assertTrue(self.db:send(H, "bob", FROM, "b" .. i, T0)) end
	local fired = self:arm("before")
	local ok, err = self.db:commit()
	fired()
	lu.assertNil(ok)
	lu.assertStrContains(err, "rolled back")
	lu.assertErrorMsgContains("no such send", self.db.outcome, self.db, 1)
	lu.assertEquals(self:stored(), 0)
	assert(self.db:begin())
	lu.assertTrue(self.db:send(H, "bob", FROM, "again", T0))
	lu.assertTrue(self.db:commit())
	lu.assertEquals(self:stored(), 1)
end

function TestPostgresInDoubt:test_batch_whose_commit_never_arrived_fails()
	self:fill(1)
	assert(self.db:begin())
	for i = 2, 3 do lu.assertEquals(self.db:store(H, "bob", FROM, "b" .. i, T0), i) end
	local fired = self:arm("before")
	local ok, err, code = self.db:commit()
	fired()
	lu.assertNil(ok)
	lu.assertEquals(code, 0)
	lu.assertStrContains(err, "rolled back")
	lu.assertEquals(self:stored(), 1, "the batch's stores are not there")
	lu.assertEquals(#assert_counter(self.db, "bob"), 1)
end

---------------------------------------------------------------------------------------------------
TestPostgresOpen = {}

function TestPostgresOpen:setUp() self.srv = server() end

function TestPostgresOpen:test_wrong_password()
	local srv = self.srv
	local db, msg, code = core.open_postgres((srv:conninfo_for():gsub("user=postgres",
		"user=" .. postgres.PASSWORD_ROLE .. " password=wrong")))
	lu.assertNil(db)
	lu.assertStrContains(msg, "cannot connect to PostgreSQL")
	lu.assertStrContains(msg, 'password authentication failed for user "offline_pw"')
	lu.assertNotStrContains(msg, "wrong", "the password is not in the message")
	lu.assertEquals(code, 0)
	db = assert(core.open_postgres((srv:conninfo_for():gsub("user=postgres",
		"user=" .. postgres.PASSWORD_ROLE .. " password=" .. postgres.PASSWORD))))
	lu.assertEquals(db:backend(), "postgres")
	db:close()
end

function TestPostgresOpen:test_unreachable_server()
	local port = self.srv.port
	local s = assert(socket.bind("127.0.0.1", 0))
	local _, free = s:getsockname()
	s:close()
	lu.assertNotEquals(tonumber(free), port)
	local db, msg, code = core.open_postgres(format("host=127.0.0.1 port=%d dbname=x sslmode=disable", free))
	lu.assertNil(db)
	lu.assertStrContains(msg, "cannot connect to PostgreSQL")
	lu.assertStrContains(msg, "Connection refused")
	lu.assertEquals(code, 0)
	db, msg = core.open_postgres("this is not a conninfo")
	lu.assertNil(db)
	lu.assertStrContains(msg, "cannot connect to PostgreSQL")
	lu.assertErrorMsgContains("string expected", function() core.open_postgres() end)
end

function TestPostgresOpen:test_schema_is_created_once_and_versioned()
	local conninfo, schema = self.srv:fresh_conninfo()
	local db = assert(core.open_postgres(conninfo))
	db:store(H, "bob", FROM, "kept", T0)
	db:close()
	lu.assertEquals(self.srv:psql(format("SELECT value FROM %s.offline_meta WHERE name = 'schema_version'", schema)), "2")
	db = assert(core.open_postgres(conninfo))
	lu.assertEquals(db:count(H, "bob"), 1, "reopening keeps the messages")
	db:close()
	self.srv:psql(format("UPDATE %s.offline_meta SET value = 99", schema))
	local none, msg, code = core.open_postgres(conninfo)
	lu.assertNil(none)
	lu.assertStrContains(msg, "schema version 99 was written by a newer offline-store")
	lu.assertEquals(code, 0)
	lu.assertEquals(self.srv:psql(format("SELECT count(*) FROM %s.offline_message", schema)), "1", "untouched")
end

-- A version 1 schema with rows (as that release created it): opening adds the lease and dedup
-- columns under the schema lock, every row and counter kept as it was.
function TestPostgresOpen:test_version_1_schema_gains_leases_and_keys_losing_nothing()
	local conninfo, schema = self.srv:fresh_conninfo()
	self.srv:psql(format([[SET search_path = %s;
CREATE TABLE offline_meta (name text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE offline_queue (host bytea NOT NULL, username bytea NOT NULL, count bigint NOT NULL,
 bytes bigint NOT NULL, PRIMARY KEY (host, username));
CREATE TABLE offline_message (id bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
 host bytea NOT NULL, username bytea NOT NULL, ts bigint NOT NULL, expire bigint,
 sender bytea NOT NULL, stanza bytea NOT NULL, meta bytea);
CREATE INDEX offline_message_user ON offline_message (host, username, id);
CREATE INDEX offline_message_expire ON offline_message (expire) WHERE expire IS NOT NULL;
CREATE INDEX offline_message_ts ON offline_message (ts);
INSERT INTO offline_message (host, username, ts, expire, sender, stanza, meta) VALUES
 ('example.org', 'bob', 1001, NULL, 'a@x', '<m>1</m>', NULL),
 ('example.org', 'bob', 1002, 9002, 'b@x', '<m>2</m>', 'm');
INSERT INTO offline_queue VALUES ('example.org', 'bob', 2, 16);
INSERT INTO offline_meta VALUES ('schema_version', 1);]], schema))
	local db = assert(core.open_postgres(conninfo))
	lu.assertEquals({ db:count(H, "bob") }, { 2, 16 })
	local got = {}
	for i, it in ipairs(db:list(H, "bob")) do got[i] = { it.id, it.ts, it.expire, it.from, it.xml, it.meta, it.lease_owner } end
	lu.assertEquals(got, { { 1, 1001, nil, "a@x", "<m>1</m>" }, { 2, 1002, 9002, "b@x", "<m>2</m>", "m" } })
	lu.assertEquals(#db:lease(H, "bob", "n:1", 1000, 2000), 2)
	lu.assertEquals({ db:store(H, "bob", FROM, "new", 1003, nil, nil, nil, nil, "k") }, { 3, 3 })
	lu.assertEquals({ db:store(H, "bob", FROM, "new", 1003, nil, nil, nil, nil, "k") }, { false, "duplicate", 3 })
	lu.assertEquals(db:release_all("n:"), 2)
	lu.assertEquals(#db:pop(H, "bob", 1000), 3)
	db:close()
	lu.assertEquals(self.srv:psql(format("SELECT value FROM %s.offline_meta WHERE name = 'schema_version'", schema)), "2")
end

function TestPostgresOpen:test_facade_and_prosody_style_table()
	local srv = self.srv
	local user = "facade" .. math.random(1e9)
	local db = assert(offline_store.open { backend = "rdbms", postgres = {
		driver = "PostgreSQL", database = srv.db, username = postgres.PASSWORD_ROLE,
		password = postgres.PASSWORD, host = "127.0.0.1", port = tostring(srv.port) } })
	lu.assertEquals(db:backend(), "postgres")
	lu.assertEquals(db:store(H, user, FROM, "x", T0), 1)
	db:close()
	db = assert(offline_store.open { backend = "postgres", postgres = srv:conninfo_for() })
	lu.assertEquals(db:count(H, user), 1, "the same tables, through a connection string")
	db:close()
	local function err(cfg)
		local ok, e = offline_store.check_config(cfg)
		lu.assertNil(ok)
		return e
	end
	lu.assertStrContains(err { backend = "postgres" }, "postgres must be set for the postgres backend")
	lu.assertStrContains(err { backend = "postgres", postgres = 5432 }, "postgres must be a libpq connection string or a table")
	lu.assertStrContains(err { backend = "postgres", postgres = { driver = "MySQL" } }, 'postgres.driver must be "PostgreSQL" (got "MySQL")')
	lu.assertStrContains(err { backend = "postgres", postgres = { db = "x" } }, 'postgres has an unknown field "db"')
	lu.assertStrContains(err { backend = "postgres", postgres = { port = "fivefour" } }, "postgres.port must be a port number")
	lu.assertStrContains(err { backend = "postgres", postgres = { password = 12 } }, "postgres.password must be a string")
	lu.assertEquals(offline_store.check_config { backend = "postgres", postgres = {
		driver = "PostgreSQL", database = "pro sody", username = "o'brien", password = "a\\b", port = 5433 } },
		{ backend = "postgres", postgres = [[port='5433' dbname='pro sody' user='o\'brien' password='a\\b']] })
	lu.assertEquals(offline_store.check_config { backend = "rdbms", postgres = "dbname=x" },
		{ backend = "postgres", postgres = "dbname=x" })
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
