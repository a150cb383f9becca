-- offline_store.batch without a server: group commit over the real core (sqlite,
-- memory; pipelined stores on a throwaway PostgreSQL), and what the callbacks are told
-- when a batch does not make it.

local lu = require "luaunit"
local support = require "support.util"
local core = require "offline_store.core"
local batch = require "offline_store.batch"
local postgres = require "support.postgres"

local H, FROM, T0 = "example.org", "alice@example.org/phone", 1700000000 * 1000000

-- A batch whose callbacks record what they were told (log.seq: in what order).
local function recorded(db, max)
	local log = { opened = 0, closed = 0, committed = {}, lost = {}, seq = {} }
	local function say(...) log.seq[#log.seq + 1] = table.concat({ ... }, " ") end
	local b = batch.new(db, {
		max = max,
		on_open = function() log.opened = log.opened + 1 end,
		on_close = function() log.closed = log.closed + 1 end,
		on_commit = function(n) log.committed[#log.committed + 1] = n; say("commit", n) end,
		on_lost = function(tokens, err, code, users)
			log.lost[#log.lost + 1] = { tokens = tokens, err = err, code = code, users = users and next(users) and users }
		end,
		on_stored = function(token, user, count) say("stored", token, user, count) end,
		on_refused = function(token, user, count, why, current) say("refused", token, user, tostring(count), why, current) end,
	})
	return b, log
end

TestBatch = {}

function TestBatch:setUp()
	self.dir = support.tmpdir()
	self.db = assert(core.open_sqlite(self.dir .. "/b.sqlite"))
end

function TestBatch:tearDown()
	self.db:close()
	support.rmrf(self.dir)
end

function TestBatch:test_stores_share_one_commit()
	local b, log = recorded(self.db)
	for i = 1, 10 do lu.assertEquals(b:store("t" .. i, H, "bob", FROM, "m" .. i, T0), i) end
	lu.assertEquals(log.opened, 1, "one batch for ten stores")
	lu.assertTrue(b.open)
	lu.assertTrue(b:flush())
	lu.assertEquals(log.committed, { 10 })
	lu.assertEquals(log.closed, 1)
	lu.assertTrue(b:flush(), "nothing open: nothing to do")
	lu.assertEquals(log.committed, { 10 })
	lu.assertEquals(#b:idle():pop(H, "bob", T0), 10)
end

function TestBatch:test_max_commits_on_its_own()
	local b, log = recorded(self.db, 4)
	for i = 1, 10 do b:store(i, H, "bob", FROM, "m" .. i, T0) end
	lu.assertEquals(log.committed, { 4, 4 }, "every 4th store commits")
	lu.assertEquals(b.n, 2)
	b:flush()
	lu.assertEquals(log.committed, { 4, 4, 2 })
end

function TestBatch:test_limit_refusal_keeps_the_batch()
	local b, log = recorded(self.db)
	lu.assertEquals(b:store(1, H, "bob", FROM, "a", T0, nil, 1), 1)
	lu.assertEquals({ b:store(2, H, "bob", FROM, "b", T0, nil, 1) }, { false, "limit", 1 })
	lu.assertTrue(b.open)
	b:flush()
	lu.assertEquals(log.committed, { 1 }, "the refused one is not counted")
	lu.assertEquals(#log.lost, 0)
end

function TestBatch:test_guarded_commits_before_other_calls()
	local b, log = recorded(self.db)
	local g = b:guarded()
	b:store(1, H, "bob", FROM, "a", T0)
	lu.assertEquals(g:count(H, "bob"), 1, "count through the stand-in commits first")
	lu.assertEquals(log.committed, { 1 })
	lu.assertEquals(g:backend(), "sqlite")
	-- and it is the same data another connection sees
	local other = assert(core.open_sqlite(self.dir .. "/b.sqlite"))
	lu.assertEquals(other:count(H, "bob"), 1)
	other:close()
end

function TestBatch:test_memory_backend_stores_at_once()
	local mem = core.open_memory()
	local b, log = recorded(mem)
	lu.assertEquals(b:store(1, H, "bob", FROM, "a", T0), 1)
	lu.assertTrue(b.unbatched)
	lu.assertFalse(b.open)
	lu.assertEquals(log.opened, 0)
	lu.assertEquals(mem:count(H, "bob"), 1, "no batch is open: the db answers directly")
	lu.assertTrue(b:flush())
	mem:close()
end

-- A db whose commit (or n-th store) fails, around a real one: what the callers learn.
local function failing(db, how)
	local stores = 0
	return setmetatable({}, { __index = function(_, k)
		if k == "commit" and how.commit then
			return function() db:rollback(); return nil, "disk I/O error", 10 end
		elseif k == "store" and how.store_at then
			return function(_, ...)
				stores = stores + 1
				if stores == how.store_at then db:rollback(); return nil, "database or disk is full", 13 end
				return db:store(...)
			end
		end
		local f = db[k]
		return function(_, ...) return f(db, ...) end
	end })
end

function TestBatch:test_failed_commit_tells_every_token()
	local b, log = recorded(failing(self.db, { commit = true }))
	for i = 1, 3 do b:store("t" .. i, H, "bob", FROM, "m" .. i, T0) end
	lu.assertEquals({ b:flush() }, { nil, "disk I/O error", 10 })
	lu.assertEquals(log.lost, { { tokens = { "t1", "t2", "t3" }, err = "disk I/O error", code = 10 } })
	lu.assertEquals(log.committed, {})
	lu.assertFalse(b.open)
	lu.assertEquals(self.db:count(H, "bob"), 0, "nothing of the batch stored")
end

function TestBatch:test_failed_store_takes_the_earlier_tokens()
	local b, log = recorded(failing(self.db, { store_at = 3 }))
	b:store("t1", H, "bob", FROM, "m1", T0)
	b:store("t2", H, "bob", FROM, "m2", T0)
	lu.assertEquals({ b:store("t3", H, "bob", FROM, "m3", T0) }, { nil, "database or disk is full", 13 },
		"the failing store answers for itself")
	lu.assertEquals(log.lost, { { tokens = { "t1", "t2" }, err = "database or disk is full", code = 13 } },
		"the others are told through on_lost")
	lu.assertFalse(b.open)
	lu.assertEquals(b:store("t4", H, "bob", FROM, "m4", T0), 1, "the next store opens a new batch")
	b:flush()
	lu.assertEquals(log.committed, { 1 })
end

-- Two hosts on one sqlite file: each has its own connection and batch, and only
-- one connection can hold the write lock. before_write lets a batch commit the
-- other's first; without it the second begin waits out the busy timeout and fails.
function TestBatch:test_before_write_frees_the_file_for_another_batch()
	local file = self.dir .. "/b.sqlite"
	local db2 = assert(core.open_sqlite(file, false, 50))
	local a, log_a = recorded(self.db)
	local b = batch.new(db2, { before_write = function() a:flush() end })
	lu.assertEquals(a:store(1, "a.example", "x", FROM, "to x", T0), 1)
	lu.assertTrue(a.open)
	lu.assertEquals(b:store(2, "b.example", "y", FROM, "to y", T0), 1, "b's store waited for nothing")
	lu.assertEquals(log_a.committed, { 1 }, "a's batch was committed first")
	b:flush()
	lu.assertEquals(#b:idle():pop("a.example", "x", T0), 1)
	lu.assertEquals(#b:idle():pop("b.example", "y", T0), 1)
	-- and without it, what the fix prevents
	local c = batch.new(db2)
	a:store(3, "a.example", "x", FROM, "again", T0)
	local count, err = c:store(4, "b.example", "y", FROM, "blocked", T0)
	lu.assertNil(count)
	lu.assertStrContains(err, "locked")
	a:flush()
	db2:close()
end

-- Pipelined (PostgreSQL's db:send): stores return true at once, and their outcomes come at the
-- flush: on_stored for those stored, on_commit, then on_refused for the others.
TestBatchPipelined = {}

function TestBatchPipelined:setUp()
	local conninfo, schema = postgres.require_server(lu):fresh_conninfo()
	self.db, self.schema = assert(core.open_postgres(conninfo)), schema
end

function TestBatchPipelined:tearDown()
	self.db:close()
end

function TestBatchPipelined:test_outcomes_come_at_the_flush()
	local b, log = recorded(self.db)
	lu.assertEquals({ b:store("t1", H, "bob", FROM, "m1", T0, nil, 2) }, { true })
	lu.assertEquals({ b:store("t2", H, "carol", FROM, "c1", T0, nil, 2, nil, nil, "k") }, { true })
	lu.assertEquals({ b:store("t3", H, "bob", FROM, "m2", T0, nil, 2) }, { true })
	lu.assertEquals({ b:store("t4", H, "bob", FROM, "m3", T0, nil, 2) }, { true })
	lu.assertEquals({ b:store("t5", H, "carol", FROM, "c1", T0, nil, 2, nil, nil, "k") }, { true })
	lu.assertEquals(log.seq, {}, "nothing is decided before the flush")
	lu.assertTrue(b:flush())
	lu.assertEquals(log.seq, { "stored t1 bob 1", "stored t2 carol 1", "stored t3 bob 2", "commit 3",
		"refused t4 bob false limit 2", "refused t5 carol false duplicate 1" })
	lu.assertEquals(log.closed, 1)
	lu.assertFalse(b.open)
	lu.assertEquals(b:idle():count(H, "bob"), 2)
end

-- An evicting store is made at once (its answer is at hand), between sends.
function TestBatchPipelined:test_evicting_store_is_made_at_once()
	local b, log = recorded(self.db)
	lu.assertTrue(b:store("t1", H, "bob", FROM, "m1", T0, nil, 1))
	lu.assertEquals({ b:store("t2", H, "bob", FROM, "m2", T0, nil, 1, nil, nil, nil, true) }, { 1, 2, 1 })
	lu.assertEquals(log.seq, { "stored t2 bob 1" })
	lu.assertTrue(b:store("t3", H, "bob", FROM, "m3", T0, nil, 1))
	lu.assertTrue(b:flush())
	lu.assertEquals(log.seq, { "stored t2 bob 1", "stored t1 bob 1", "commit 2", "refused t3 bob false limit 1" })
	lu.assertEquals(b:idle():pop(H, "bob", T0)[1].xml, "m2")
end

-- The batch fails on the server: every token, sent or not, goes to on_lost; no outcome is told.
function TestBatchPipelined:test_failed_batch_tells_every_token()
	postgres.require_server(lu):psql(string.format(
		"ALTER TABLE %s.offline_message ADD CONSTRAINT short CHECK (octet_length(stanza) < 10)", self.schema))
	local b, log = recorded(self.db)
	lu.assertTrue(b:store("t1", H, "bob", FROM, "m1", T0))
	lu.assertTrue(b:store("t2", H, "bob", FROM, "far too long", T0))
	lu.assertTrue(b:store("t3", H, "bob", FROM, "m3", T0, nil, 1))
	local ok, err = b:flush()
	lu.assertNil(ok)
	lu.assertStrContains(err, "23514")
	lu.assertEquals(#log.lost, 1)
	lu.assertEquals(log.lost[1].tokens, { "t1", "t2", "t3" })
	lu.assertEquals(log.lost[1].users, { "bob", "bob", "bob" }, "sent: nobody heard of them before")
	lu.assertEquals(log.seq, {})
	lu.assertEquals(b:idle():count(H, "bob"), 0)
	lu.assertTrue(b:store("t4", H, "bob", FROM, "m4", T0), "the next store opens a new batch")
	lu.assertTrue(b:flush())
	lu.assertEquals(log.seq, { "stored t4 bob 1", "commit 1" })
end

function TestBatchPipelined:test_max_flushes_sends()
	local b, log = recorded(self.db, 4)
	for i = 1, 10 do lu.assertTrue(b:store(i, H, "bob", FROM, "m" .. i, T0)) end
	lu.assertEquals(log.committed, { 4, 4 })
	lu.assertTrue(b:flush())
	lu.assertEquals(log.committed, { 4, 4, 2 })
	lu.assertEquals(b:idle():count(H, "bob"), 10)
end

-- A callback that stores (a handler of offline-store/stored queueing a notice) opens the next
-- batch in the middle of the flush: every outcome of the flushed batch is still told.
function TestBatchPipelined:test_a_callback_that_stores_misses_no_outcome()
	local seq, b, noticed = {}, nil, false
	b = batch.new(self.db, {
		on_stored = function(token) seq[#seq + 1] = "stored " .. token end,
		on_commit = function()
			seq[#seq + 1] = "commit"
			if not noticed then
				noticed = true
				b:store("notice", H, "admin", FROM, "n", T0)
			end
		end,
		on_refused = function(token, _, _, why) seq[#seq + 1] = "refused " .. token .. " " .. why end,
	})
	lu.assertTrue(b:store("t1", H, "bob", FROM, "m1", T0, nil, 1))
	lu.assertTrue(b:store("t2", H, "bob", FROM, "m2", T0, nil, 1))
	lu.assertTrue(b:store("t3", H, "bob", FROM, "m3", T0, nil, 1))
	lu.assertTrue(b:flush())
	lu.assertEquals(seq, { "stored t1", "commit", "refused t2 limit", "refused t3 limit" })
	lu.assertTrue(b.open, "the notice's batch")
	lu.assertTrue(b:flush())
	lu.assertEquals(seq[#seq - 1], "stored notice")
	lu.assertEquals(b:idle():count(H, "admin"), 1)
end
