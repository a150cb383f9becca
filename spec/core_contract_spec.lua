-- The storage contract, written once and run against every backend.
-- Each backend gets its own Test class built by contract(); a fresh store per test.

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local support = require "support.util"
local core = require "offline_store.core"

local H, U = "example.org", "bob"
local FROM = "alice@example.org/phone"
local T0 = 1700000000 * 1000000 -- a µs timestamp

-- Stores n messages "<prefix>1".."<prefix>n" for (host, user); returns their ids.
local function fill(db, n, host, user, prefix, opts)
	opts = opts or {}
	local ids = {}
	for i = 1, n do
		local count, id = db:store(host or H, user or U, FROM, (prefix or "m") .. i, T0 + i,
			opts.expire, opts.max, opts.max_bytes, opts.meta, opts.dedup and opts.dedup .. i)
		assert(count, id)
		ids[i] = id
	end
	return ids
end

local function xmls(items)
	local out = {}
	for i, it in ipairs(items) do out[i] = it.xml end
	return out
end

-- count and bytes as the queue's own rows say they should be.
local function truth(db, host, user)
	local items = assert(db:list(host or H, user or U))
	local bytes = 0
	for _, it in ipairs(items) do bytes = bytes + #it.xml end
	return #items, bytes
end

local function assert_counter(db, host, user)
	local c, b = db:count(host or H, user or U)
	local tc, tb = truth(db, host, user)
	lu.assertEquals({ c, b }, { tc, tb }, "counter disagrees with the stored rows")
end

-- Whether f is running further up the stack (a finalizer sees the core call it runs in).
local function on_stack(f)
	for level = 3, 200 do
		local info = debug.getinfo(level, "f")
		if not info then return false end
		if info.func == f then return true end
	end
	return false
end

-- Runs call() while finalizers keep firing inside it: the collector starts a cycle as
-- soon as the last one ends and works fast (pause 50, step multiplier 1000), and each
-- finalizer arms the next. Each one that finds `inside` (a core method) on the stack
-- runs reenter() and keeps what it raised (a finalizer's own error would only be a
-- warning). Returns call()'s results and the list of errors.
local function with_finalizers(inside, reenter, call)
	local errors, armed = {}, true
	local function arm()
		setmetatable({}, { __gc = function()
			if not armed then return end
			if on_stack(inside) then
				local ok, err = pcall(reenter)
				errors[#errors + 1] = ok and "(no error)" or tostring(err)
			end
			arm()
		end })
	end
	collectgarbage("incremental", 50, 1000)
	collectgarbage() -- (so that the next cycle starts at once)
	for _ = 1, 10 do arm() end -- (one may stay reachable from a stale stack slot)
	local r = table.pack(pcall(call))
	armed = false
	collectgarbage("incremental", 200, 100) -- Lua's defaults
	collectgarbage()
	if not r[1] then error(r[2], 0) end
	return errors, table.unpack(r, 2, r.n)
end

local BUSY = "offline_store: store is busy (re-entrant call from a callback)"

-- Every error in errors is the busy one, and there is at least one.
local function assert_all_busy(errors, what)
	lu.assertTrue(#errors > 0, what .. ": no finalizer ran inside the call (the test did not test)")
	for _, e in ipairs(errors) do lu.assertStrContains(e, BUSY, false, what) end
end

-- A stanza tree built by hand whose child's name is looked up through __index,
-- which runs action() (a metamethod that runs while db:store serializes).
local function tree_with_hook(action)
	local child = setmetatable({ attr = {} }, { __index = function(_, k)
		if k == "name" then action(); return "hook" end
	end })
	return { name = "message", attr = { to = "bob@example.org" }, child }
end
local HOOKED = "<message to='bob@example.org'><hook/></message>"

-- open() returns a fresh store; finish(), if given, runs once after the class.
local function contract(open, finish)
	local T = { teardownClass = finish }

	function T:setUp() self.db = open() end
	function T:tearDown() self.db:close() end

	function T:test_arrival_order_over_1000()
		local ids = fill(self.db, 1000)
		for i = 2, #ids do lu.assertTrue(ids[i] > ids[i - 1], "ids are monotonic") end
		local items, expired = self.db:pop(H, U, T0)
		lu.assertEquals(#items, 1000)
		lu.assertEquals(expired, 0)
		for i, it in ipairs(items) do
			lu.assertEquals(it.xml, "m" .. i)
			lu.assertEquals(it.id, ids[i])
			lu.assertEquals(it.ts, T0 + i)
			lu.assertEquals(it.from, FROM)
			lu.assertNil(it.expire)
		end
		lu.assertEquals(self.db:count(H, U), 0)
		lu.assertEquals(#self.db:pop(H, U, T0), 0, "a second pop finds nothing")
	end

	function T:test_limit_is_exact()
		for i = 1, 3 do lu.assertEquals(self.db:store(H, U, FROM, "x" .. i, T0, nil, 3), i) end
		local ok, why, count = self.db:store(H, U, FROM, "x4", T0, nil, 3)
		lu.assertEquals({ ok, why, count }, { false, "limit", 3 })
		lu.assertEquals(self.db:count(H, U), 3)
		lu.assertEquals(xmls(self.db:pop(H, U, T0)), { "x1", "x2", "x3" })
		-- after the pop there is room again
		lu.assertEquals(self.db:store(H, U, FROM, "x5", T0, nil, 3), 1)
	end

	function T:test_limit_zero_stores_nothing()
		lu.assertEquals({ self.db:store(H, U, FROM, "x", T0, nil, 0) }, { false, "limit", 0 })
		lu.assertEquals({ self.db:count(H, U) }, { 0, 0 })
		lu.assertEquals(#self.db:list(H, U), 0)
	end

	function T:test_limit_counts_expired_unpurged()
		self.db:store(H, U, FROM, "old", T0, T0 + 1, 2)
		self.db:store(H, U, FROM, "old2", T0, T0 + 1, 2)
		lu.assertEquals({ self.db:store(H, U, FROM, "new", T0 + 10, nil, 2) }, { false, "limit", 2 })
		lu.assertEquals(self.db:delete_expired(T0 + 5), 2)
		lu.assertEquals(self.db:store(H, U, FROM, "new", T0 + 10, nil, 2), 1)
	end

	function T:test_bytes_limit()
		lu.assertEquals({ self.db:store(H, U, FROM, "12345678901", T0, nil, nil, 10) }, { false, "limit", 0 },
			"a message larger than the limit on its own, into an empty queue")
		lu.assertEquals({ self.db:count(H, U) }, { 0, 0 })
		lu.assertEquals(self.db:store(H, U, FROM, "12345", T0, nil, nil, 10), 1)
		lu.assertEquals({ self.db:store(H, U, FROM, "123456", T0, nil, nil, 10) }, { false, "limit", 1 })
		lu.assertEquals(self.db:store(H, U, FROM, "12345", T0, nil, nil, 10), 2)
		lu.assertEquals({ self.db:count(H, U) }, { 2, 10 })
		lu.assertEquals({ self.db:store(H, U, FROM, "1", T0, nil, 100, 10) }, { false, "limit", 2 })
		lu.assertEquals({ self.db:store(H, U, FROM, "1", T0, nil, 2, 100) }, { false, "limit", 2 },
			"the count limit refuses what the bytes limit would take")
		lu.assertEquals({ self.db:count(H, U) }, { 2, 10 }, "refusals change nothing")
		lu.assertEquals(xmls(self.db:pop(H, U, T0)), { "12345", "12345" })
	end

	-- Over the limit with evict (the last argument), the oldest rows go to make room for
	-- the new one, in the same transaction, and store says how many went.
	function T:test_evict_oldest_by_count()
		local db = self.db
		fill(db, 3)
		local count, id, evicted = db:store(H, U, FROM, "new1", T0, nil, 3, nil, nil, nil, true)
		lu.assertEquals({ count, evicted }, { 3, 1 })
		lu.assertIsNumber(id)
		lu.assertEquals(xmls(db:list(H, U)), { "m2", "m3", "new1" })
		lu.assertEquals({ db:store(H, U, FROM, "new2", T0, nil, 5, nil, nil, nil, true) }, { 4, id + 1, 0 },
			"with room, nothing goes")
		lu.assertEquals(select("#", db:store(H, "carol", FROM, "x", T0, nil, 5)), 2,
			"without evict, store returns count and id")
		local _
		count, _, evicted = db:store(H, U, FROM, "new3", T0, nil, 2, nil, nil, nil, true)
		lu.assertEquals({ count, evicted }, { 2, 3 }, "as many as it takes: a lower limit evicts several")
		lu.assertEquals(xmls(db:list(H, U)), { "new2", "new3" })
		assert_counter(db)
		lu.assertEquals({ db:store(H, U, FROM, "x", T0, nil, 2) }, { false, "limit", 2 },
			"without evict the limit refuses as before")
	end

	function T:test_evict_oldest_by_bytes()
		local db = self.db
		for _, x in ipairs { "aaaa", "bbb", "cc" } do assert(db:store(H, U, FROM, x, T0, nil, nil, 10)) end
		local count, _, evicted = db:store(H, U, FROM, "dddddd", T0, nil, nil, 10, nil, nil, true)
		lu.assertEquals({ count, evicted }, { 2, 2 }, "9 + 6 bytes: two of the oldest make room for 6")
		lu.assertEquals(xmls(db:list(H, U)), { "cc", "dddddd" })
		lu.assertEquals({ db:count(H, U) }, { 2, 8 })
		count, _, evicted = db:store(H, U, FROM, "eeeeeeeeee", T0, nil, 100, 10, nil, nil, true)
		lu.assertEquals({ count, evicted }, { 1, 2 }, "a message as large as the whole quota empties the queue")
		lu.assertEquals({ db:count(H, U) }, { 1, 10 })
		assert_counter(db)
	end

	function T:test_evict_refuses_what_could_never_fit()
		local db = self.db
		fill(db, 2)
		lu.assertEquals({ db:store(H, U, FROM, "123456", T0, nil, nil, 5, nil, nil, true) }, { false, "limit", 2 },
			"larger than the whole byte quota: refused, nothing evicted")
		lu.assertEquals({ db:store(H, U, FROM, "x", T0, nil, 0, nil, nil, nil, true) }, { false, "limit", 2 },
			"a count limit of 0: refused, nothing evicted")
		lu.assertEquals({ db:store(H, "carol", FROM, "123456", T0, nil, nil, 5, nil, nil, true) }, { false, "limit", 0 })
		lu.assertEquals(xmls(db:list(H, U)), { "m1", "m2" })
		assert_counter(db)
	end

	function T:test_evict_passes_over_leased_rows()
		local db = self.db
		fill(db, 5)
		lu.assertEquals(xmls(db:lease(H, U, "n1", T0, T0 + 100, 2)), { "m1", "m2" })
		local count, _, evicted = db:store(H, U, FROM, "new", T0, nil, 4, nil, nil, nil, true)
		lu.assertEquals({ count, evicted }, { 4, 2 })
		lu.assertEquals(xmls(db:list(H, U)), { "m1", "m2", "m5", "new" }, "the leased rows stay; the oldest free ones go")
		assert_counter(db)
		-- a lease whose time ran out still has its owner: not evicted either
		lu.assertEquals(db:release(H, U, "n1"), 2)
		lu.assertEquals(xmls(db:lease(H, U, "n2", T0, T0 + 1)), { "m1", "m2", "m5", "new" })
		lu.assertEquals({ db:store(H, U, FROM, "refused", T0 + 10, nil, 4, nil, nil, nil, true) }, { false, "limit", 4 },
			"only leased rows left: refused, nothing evicted")
		lu.assertEquals(xmls(db:list(H, U)), { "m1", "m2", "m5", "new" })
		assert_counter(db)
		-- released: the room is there again
		lu.assertEquals(db:release(H, U, "n2"), 4)
		lu.assertEquals(select(3, db:store(H, U, FROM, "last", T0, nil, 4, nil, nil, nil, true)), 1)
		lu.assertEquals(xmls(db:list(H, U)), { "m2", "m5", "new", "last" })
	end

	function T:test_evict_takes_set_aside_and_expired_rows_like_any()
		local db = self.db
		assert(db:store(H, U, FROM, "aside", T0, nil, nil, nil, core.SET_ASIDE))
		assert(db:store(H, U, FROM, "expired", T0, T0 + 1))
		assert(db:store(H, U, FROM, "live", T0))
		lu.assertEquals(select(3, db:store(H, U, FROM, "new", T0 + 10, nil, 2, nil, nil, nil, true)), 2)
		lu.assertEquals(xmls(db:list(H, U)), { "live", "new" })
		assert_counter(db)
	end

	function T:test_evict_after_dedup()
		local db = self.db
		fill(db, 2, H, U, "m", { dedup = "k" })
		lu.assertEquals({ db:store(H, U, FROM, "again", T0, nil, 2, nil, nil, "k2", true) }, { false, "duplicate", 2 },
			"a duplicate is refused before anything is evicted")
		lu.assertEquals({ db:store(H, U, FROM, "again", T0, nil, 2, nil, nil, "k1", true) }, { false, "duplicate", 2 },
			"the oldest row's key counts until it is evicted")
		lu.assertEquals(select(3, db:store(H, U, FROM, "new", T0, nil, 2, nil, nil, "k3", true)), 1)
		lu.assertEquals(select(3, db:store(H, U, FROM, "again", T0, nil, 2, nil, nil, "k1", true)), 1,
			"an evicted row's key goes with it")
		lu.assertEquals(xmls(db:list(H, U)), { "new", "again" })
	end

	function T:test_evict_inside_a_batch()
		local db = self.db
		fill(db, 2, H, U, "before")
		local batched = db:begin()
		for i = 1, 4 do
			local count, _, evicted = db:store(H, U, FROM, "in" .. i, T0 + i, nil, 3, nil, nil, nil, true)
			lu.assertEquals({ count, evicted }, { math.min(2 + i, 3), i == 1 and 0 or 1 }, "store " .. i)
		end
		lu.assertEquals(db:store(H, "carol", FROM, "other", T0, nil, 3, nil, nil, nil, true), 1)
		lu.assertTrue(db:commit())
		lu.assertEquals(xmls(db:list(H, U)), { "in2", "in3", "in4" }, "the batch's own rows are evicted too")
		assert_counter(db)
		if batched then
			lu.assertTrue(db:begin())
			lu.assertEquals(select(3, db:store(H, U, FROM, "rolled back", T0, nil, 1, nil, nil, nil, true)), 3)
			lu.assertTrue(db:rollback())
			lu.assertEquals(xmls(db:list(H, U)), { "in2", "in3", "in4" }, "a rollback undoes the eviction")
			assert_counter(db)
		end
	end

	function T:test_counter_follows_every_operation()
		local ids = fill(self.db, 6)
		assert_counter(self.db)
		lu.assertEquals(self.db:remove(H, U, { ids[2], ids[4] }), 2)
		assert_counter(self.db)
		lu.assertEquals(self.db:count(H, U), 4)
		lu.assertEquals(self.db:remove(H, U, { ids[2], 999999 }), 0, "already removed and unknown ids")
		assert_counter(self.db)
		self.db:store(H, U, FROM, "exp", T0 + 100, T0 + 200)
		lu.assertEquals(self.db:delete_expired(T0 + 150), 0)
		lu.assertEquals(self.db:delete_expired(T0 + 200), 1, "expire == now counts as expired")
		assert_counter(self.db)
		lu.assertEquals(self.db:delete_older_than(T0 + 4), 2, "m1 and m3 are older than T0+4")
		assert_counter(self.db)
		lu.assertEquals(xmls(self.db:list(H, U)), { "m5", "m6" })
		lu.assertEquals(self.db:remove_user(H, U), 2)
		lu.assertEquals({ self.db:count(H, U) }, { 0, 0 })
		fill(self.db, 3)
		lu.assertEquals(self.db:remove_host(H), 3)
		lu.assertEquals({ self.db:count(H, U) }, { 0, 0 })
		lu.assertEquals(self.db:store(H, U, FROM, "again", T0, nil, 1), 1, "counter restarts at zero")
	end

	-- A long list (a page confirmed at once is 100 ids): every id listed goes, once, whatever
	-- the order, repeats, ids of another user's queue or unknown ids in it; nothing else goes.
	function T:test_remove_a_long_list_of_ids()
		local ids = fill(self.db, 90)
		local other = fill(self.db, 3, H, "other")
		local list = {}
		for i = 80, 11, -1 do list[#list + 1] = ids[i] end -- 70 ids, backwards
		list[#list + 1] = ids[40]
		list[#list + 1] = other[2]
		list[#list + 1] = 999999
		lu.assertEquals(self.db:remove(H, U, list), 70)
		assert_counter(self.db)
		assert_counter(self.db, H, "other")
		local want = {}
		for i = 1, 10 do want[#want + 1] = "m" .. i end
		for i = 81, 90 do want[#want + 1] = "m" .. i end
		lu.assertEquals(xmls(self.db:list(H, U)), want)
		lu.assertEquals(self.db:count(H, "other"), 3)
		lu.assertEquals(self.db:confirm(H, U, list), 0, "gone already")
	end

	function T:test_pop_max_deletes_only_what_it_returned()
		fill(self.db, 5)
		lu.assertEquals(xmls(self.db:pop(H, U, T0, 2)), { "m1", "m2" })
		lu.assertEquals(self.db:count(H, U), 3)
		assert_counter(self.db)
		lu.assertEquals(xmls(self.db:pop(H, U, T0)), { "m3", "m4", "m5" })
		lu.assertEquals(#self.db:pop(H, U, T0, 0), 0)
	end

	function T:test_expired_never_returned_and_purged()
		self.db:store(H, U, FROM, "keep1", T0, nil)
		self.db:store(H, U, FROM, "gone", T0, T0 + 10)
		self.db:store(H, U, FROM, "keep2", T0, T0 + 1000)
		self.db:store(H, U, FROM, "gone2", T0, T0 + 20)
		local items, expired = self.db:pop(H, U, T0 + 500)
		lu.assertEquals(xmls(items), { "keep1", "keep2" })
		lu.assertEquals(items[2].expire, T0 + 1000)
		lu.assertEquals(expired, 2)
		lu.assertEquals({ self.db:count(H, U) }, { 0, 0 }, "expired rows are deleted with the pop")
	end

	function T:test_delete_expired_spans_users_and_hosts()
		self.db:store(H, "a", FROM, "1", T0, T0 + 1)
		self.db:store(H, "b", FROM, "22", T0, T0 + 1)
		self.db:store("other.org", "a", FROM, "333", T0, T0 + 1)
		self.db:store(H, "a", FROM, "4444", T0, nil)
		lu.assertEquals(self.db:delete_expired(T0 + 1), 3)
		lu.assertEquals({ self.db:count(H, "a") }, { 1, 4 })
		lu.assertEquals({ self.db:count(H, "b") }, { 0, 0 })
		lu.assertEquals({ self.db:count("other.org", "a") }, { 0, 0 })
		lu.assertEquals(self.db:users(H), { { user = "a", count = 1, bytes = 4 } })
	end

	function T:test_isolation_between_users_and_hosts()
		fill(self.db, 2, "h1", "u", "h1u")
		fill(self.db, 3, "h2", "u", "h2u")
		fill(self.db, 4, "h1", "v", "h1v")
		-- keys that are equal once concatenated must still be distinct
		fill(self.db, 1, "ab", "c", "abc")
		fill(self.db, 1, "a", "bc", "a-bc")
		lu.assertEquals(self.db:count("h1", "u"), 2)
		lu.assertEquals(self.db:count("h2", "u"), 3)
		lu.assertEquals(xmls(self.db:pop("h1", "u", T0)), { "h1u1", "h1u2" })
		lu.assertEquals(self.db:count("h2", "u"), 3)
		lu.assertEquals(self.db:count("h1", "v"), 4)
		lu.assertEquals(xmls(self.db:list("ab", "c")), { "abc1" })
		lu.assertEquals(xmls(self.db:list("a", "bc")), { "a-bc1" })
		lu.assertEquals(self.db:remove_host("h2"), 3)
		lu.assertEquals(self.db:count("h1", "v"), 4)
		lu.assertEquals(self.db:remove_user("h1", "v"), 4)
		lu.assertEquals(self.db:count("ab", "c"), 1)
		local ids = self.db:list("a", "bc")
		lu.assertEquals(self.db:remove("ab", "c", { ids[1].id }), 0, "another user's id is not removed")
	end

	-- A row stored with meta = core.SET_ASIDE (a message that could not be
	-- delivered) stays in its queue through every pop, counted and listed.
	function T:test_set_aside_rows_stay_through_pop()
		local db = self.db
		fill(db, 2, H, U, "a")
		local _, aside = assert(db:store(H, U, FROM, "<damaged", T0, nil, nil, nil, core.SET_ASIDE))
		fill(db, 2, H, U, "b")
		-- (a meta that only starts like the marker is any row's)
		assert(db:store(H, U, FROM, "c", T0, nil, nil, nil, core.SET_ASIDE .. "x"))
		lu.assertEquals(db:count(H, U), 6)
		lu.assertEquals({ db:store(H, U, FROM, "over", T0, nil, 6) }, { false, "limit", 6 },
			"it counts toward the limit")
		local items, expired = db:pop(H, U, T0)
		lu.assertEquals(xmls(items), { "a1", "a2", "b1", "b2", "c" })
		lu.assertEquals(expired, 0)
		lu.assertEquals({ db:count(H, U) }, { 1, #"<damaged" })
		assert_counter(db)
		local listed = db:list(H, U)
		lu.assertEquals(#listed, 1)
		lu.assertEquals({ listed[1].id, listed[1].xml, listed[1].meta }, { aside, "<damaged", core.SET_ASIDE })
		lu.assertEquals(#db:pop(H, U, T0), 0, "not handed out again")
		lu.assertEquals(db:count(H, U), 1)
		-- pop's max counts the rows it hands out, not the one it steps over
		fill(db, 3, H, U, "d")
		lu.assertEquals(xmls(db:pop(H, U, T0, 2)), { "d1", "d2" })
		lu.assertEquals(db:count(H, U), 2)
		assert_counter(db)
		lu.assertEquals(xmls(db:pop(H, U, T0)), { "d3" })
		-- new messages queue behind it and pop as usual
		fill(db, 1, H, U, "e")
		lu.assertEquals(xmls(db:pop(H, U, T0)), { "e1" })
		lu.assertEquals(db:count(H, U), 1)
		assert_counter(db)
	end

	function T:test_set_aside_rows_go_with_every_removal()
		local db = self.db
		local function aside(user, ts, expire)
			return select(2, assert(db:store(H, user, FROM, "<damaged", ts, expire, nil, nil, core.SET_ASIDE)))
		end
		local id = aside("r1", T0)
		fill(db, 1, H, "r1")
		lu.assertEquals(db:remove(H, "r1", { id }), 1, "remove")
		aside("r2", T0)
		lu.assertEquals(db:remove_user(H, "r2"), 1, "remove_user")
		aside("r3", T0, T0 + 10)
		lu.assertEquals(#db:pop(H, "r3", T0 + 20), 0)
		lu.assertEquals(db:delete_expired(T0 + 20), 1, "delete_expired")
		aside("r4", T0)
		lu.assertEquals(db:delete_older_than(T0 + 1), 1, "delete_older_than")
		aside("r5", T0 + 100)
		local users = db:users(H) -- (in no promised order)
		table.sort(users, function(a, b) return a.user < b.user end)
		lu.assertEquals(#users, 2)
		lu.assertEquals({ users[2].user, users[2].count }, { "r5", 1 }, "users")
		lu.assertEquals(db:remove_host(H), 2, "remove_host")
		for _, user in ipairs { "r1", "r2", "r3", "r4", "r5" } do lu.assertEquals(db:count(H, user), 0, user) end
	end

	function T:test_binary_payloads_round_trip()
		local nul = "a\0b\0\0c"
		local bad_utf8 = "\xff\xfe\xc3\x28 \xed\xa0\x80"
		local big = ("0123456789abcdef"):rep(65536) -- 1 MiB
		self.db:store(H, U, "x\0y", nul, T0)
		self.db:store(H, U, FROM, bad_utf8, T0, nil, nil, nil, "\0meta\xff")
		self.db:store(H, U, FROM, big, T0)
		self.db:store("h\0st", "u\0ser", FROM, "k", T0)
		local items = self.db:pop(H, U, T0)
		lu.assertEquals(#items, 3)
		lu.assertEquals(items[1].xml, nul)
		lu.assertEquals(items[1].from, "x\0y")
		lu.assertNil(items[1].meta)
		lu.assertEquals(items[2].xml, bad_utf8)
		lu.assertEquals(items[2].meta, "\0meta\xff")
		lu.assertEquals(#items[3].xml, 1048576)
		lu.assertTrue(items[3].xml == big)
		lu.assertEquals(self.db:count("h\0st", "u\0ser"), 1)
		lu.assertEquals(self.db:count("h", "u"), 0)
	end

	function T:test_list_pages_without_deleting()
		local ids = fill(self.db, 25)
		local seen, after = {}, 0
		for _ = 1, 10 do
			local page = self.db:list(H, U, after, 10)
			if #page == 0 then break end
			lu.assertTrue(#page <= 10)
			for _, it in ipairs(page) do seen[#seen + 1] = it.id end
			after = page[#page].id
		end
		lu.assertEquals(seen, ids)
		lu.assertEquals(self.db:count(H, U), 25)
		lu.assertEquals(#self.db:list(H, U, ids[25]), 0)
		lu.assertEquals(#self.db:list(H, U, 0, 0), 0)
		lu.assertEquals(#self.db:list(H, "nobody"), 0)
	end

	function T:test_users_lists_queues_of_a_host()
		fill(self.db, 2, H, "carol")
		fill(self.db, 1, H, "bob")
		fill(self.db, 1, "other.org", "dave")
		local users = self.db:users(H)
		table.sort(users, function(a, b) return a.user < b.user end)
		lu.assertEquals(users, { { user = "bob", count = 1, bytes = 2 }, { user = "carol", count = 2, bytes = 4 } })
		self.db:pop(H, "bob", T0)
		lu.assertEquals(#self.db:users(H), 1, "an emptied queue is not listed")
	end

	function T:test_ids_stay_monotonic_after_emptying()
		local first = fill(self.db, 3)
		self.db:pop(H, U, T0)
		local second = fill(self.db, 1)
		lu.assertTrue(second[1] > first[3])
	end

	function T:test_bad_arguments_raise()
		local db = self.db
		lu.assertErrorMsgContains("bad argument #1 to 'store' (string expected, got no value)",
			function() db:store() end)
		lu.assertErrorMsgContains("number has no integer representation", function() db:store(H, U, FROM, "x", 1.5) end)
		lu.assertErrorMsgContains("must not be negative", function() db:store(H, U, FROM, "x", T0, nil, -1) end)
		lu.assertErrorMsgContains("must not be negative", function() db:store(H, U, FROM, "x", T0, nil, nil, -1) end)
		lu.assertErrorMsgContains("ids must be integers", function() db:remove(H, U, { 1, "two" }) end)
		lu.assertErrorMsgContains("table expected", function() db:remove(H, U, 1) end)
		lu.assertErrorMsgContains("offline_store.db expected", function() db.count({}, H, U) end)
		lu.assertEquals({ db:count(H, U) }, { 0, 0 }, "nothing was stored by the bad calls")
	end

	function T:test_lifecycle()
		local db = self.db
		lu.assertStrContains(tostring(db), db:backend())
		db:close()
		db:close() -- twice is fine
		lu.assertStrContains(tostring(db), "(closed)")
		lu.assertErrorMsgContains("attempt to use a closed offline store", function() db:count(H, U) end)
		lu.assertErrorMsgContains("attempt to use a closed offline store", function() db:store(H, U, FROM, "x", T0) end)
		self.db = open() -- for tearDown
	end

	-- Group commit: begin() opens a batch (true) on backends that have one, or says
	-- false and every store stays its own transaction. Either way the caller sees
	-- the same queue.
	-- The sender comes back as given, whatever the stanza says (sqlite keeps a sender
	-- equal to the stanza's own from attribute only once).
	function T:test_sender_round_trips()
		local cases = {
			{ "alice@example.org/phone", "<message from='alice@example.org/phone' to='bob@example.org'/>" },
			{ "alice@example.org/phone", [[<message to='bob@example.org' from="alice@example.org/phone"><body/></message>]] },
			{ "alice@example.org/phone", "<message from='mallory@example.org/x'/>" },
			{ "a'b@example.org/r&s", "<message from='a&apos;b@example.org/r&amp;s'/>" },
			{ "", "<message from='alice@example.org/phone'/>" },
			{ "alice@example.org", "<message to='bob@example.org'/>" },
			{ "alice@example.org", "<message ns1:from='alice@example.org' xmlns:ns1='urn:x'/>" },
			{ "alice@example.org", "<message from='alice@example.org" },
			{ "alice@example.org", "not xml at all" },
			{ "x", "<from from='y' />" },
			{ "\0nul", "<message from='\0nul'/>" },
		}
		for i, c in ipairs(cases) do
			lu.assertEquals(self.db:store(H, U, c[1], c[2], T0 + i), i)
		end
		for i, it in ipairs(self.db:list(H, U)) do
			lu.assertEquals({ it.from, it.xml }, cases[i], "case " .. i)
		end
		for i, it in ipairs(self.db:pop(H, U, T0)) do
			lu.assertEquals({ it.from, it.xml }, cases[i], "popped, case " .. i)
		end
	end

	-- db:store also takes a util.stanza tree: stored as core.serialize(tree, true)
	-- writes it, without the top element's delays, with no Lua string in between.
	-- A tree deeper than the C serializer goes is refused (false, "too deep") and
	-- nothing is stored; a malformed one raises. (Trees built by hand, in the shape
	-- util.stanza gives them: name, attr, children at 1..n.)
	function T:test_store_takes_a_stanza()
		local function el(name, attr, ...) return { name = name, attr = attr or {}, ... } end
		local db = self.db
		local m = el("message", { from = FROM },
			el("delay", { xmlns = "urn:xmpp:delay" }),
			el("body", nil, "x < y & z"),
			el("x", { xmlns = "jabber:x:delay" }),
			el("forwarded", { xmlns = "urn:xmpp:forward:0" }, el("delay", { xmlns = "urn:xmpp:delay" })))
		local want = "<message from='alice@example.org/phone'><body>x &lt; y &amp; z</body>"
			.. "<forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay'/></forwarded></message>"
		lu.assertEquals(core.serialize(m, true), want)
		lu.assertEquals(db:store(H, U, FROM, m, T0), 1)
		local body = ("b"):rep(100000)
		lu.assertEquals(db:store(H, U, FROM, el("message", { from = FROM }, el("body", nil, body)), T0), 2)
		lu.assertEquals(db:store(H, U, "", m, T0), 3, "after a stanza bigger than the kept buffer")
		local deep = el("message")
		local tip = deep
		for _ = 1, 300 do tip[1] = el("x"); tip = tip[1] end
		local batched = db:begin()
		lu.assertEquals({ db:store(H, U, FROM, deep, T0) }, { false, "too deep" })
		lu.assertErrorMsgContains("has no attr table", db.store, db, H, U, FROM, { name = "message" }, T0)
		lu.assertErrorMsgContains("is a boolean", db.store, db, H, U, FROM, { name = true, attr = {} }, T0)
		lu.assertEquals(db:store(H, U, FROM, "after", T0), 4, "nothing was stored by those, the batch goes on")
		if batched then lu.assertTrue(db:commit()) end
		assert_counter(db, H, U)
		local items = db:pop(H, U, T0)
		lu.assertEquals(xmls(items), { want, "<message from='alice@example.org/phone'><body>" .. body .. "</body></message>",
			want, "after" })
		lu.assertEquals({ items[1].from, items[3].from }, { FROM, "" })
	end

	function T:test_batch_stores_count_and_commit()
		local db = self.db
		local last = fill(db, 2, H, U, "before")[2]
		local batched = db:begin()
		lu.assertIsBoolean(batched)
		for i = 1, 5 do
			local count, id = db:store(H, U, FROM, "in" .. i, T0 + i, nil, 7)
			lu.assertEquals(count, 2 + i, "stores in a batch count what the batch stored")
			lu.assertTrue(id > last, "ids stay monotonic")
			last = id
		end
		lu.assertEquals(db:store(H, U, FROM, "last", T0, nil, 8), 8)
		lu.assertEquals({ db:store(H, U, FROM, "refused", T0, nil, 8) }, { false, "limit", 8 },
			"the limit sees the batch's own stores")
		if batched then
			lu.assertErrorMsgContains("a batch is open", db.count, db, H, U)
			lu.assertErrorMsgContains("a batch is open", db.pop, db, H, U, T0)
			lu.assertErrorMsgContains("a batch is open", db.begin, db)
		end
		lu.assertEquals(db:store(H, "carol", FROM, "other queue", T0), 1, "a refusal does not end the batch")
		lu.assertTrue(db:commit())
		lu.assertTrue(db:commit(), "commit with nothing open does nothing")
		lu.assertEquals(xmls(db:pop(H, U, T0)), { "before1", "before2", "in1", "in2", "in3", "in4", "in5", "last" })
		lu.assertEquals(xmls(db:pop(H, "carol", T0)), { "other queue" })
	end

	-- A batch of many stores (sqlite writes them a chunk of 256, or of 1 MB, at a
	-- time, 32 rows per statement, and the rest at the commit): every row comes
	-- back as given, the counts and the limit include the batch's own stores all
	-- along, and big stanzas between small ones are whole.
	function T:test_large_batch_round_trips()
		local db = self.db
		fill(db, 1, H, U, "before")
		local batched = db:begin()
		local users, want, n = { U, "carol", "dave" }, { [U] = { "before1" }, carol = {}, dave = {} }, { [U] = 1, carol = 0, dave = 0 }
		local big = "<message from='x@y/z'><body>" .. ("b"):rep(100000) .. "</body></message>"
		for i = 1, 600 do
			local user = users[i % 3 + 1]
			local from, xml, meta, expire = FROM, ("<message from='%s'><body>%d</body></message>"):format(FROM, i), nil, nil
			if i % 5 == 0 then from = "other@example.org" end
			if i % 7 == 0 then meta = "meta" .. i end
			if i % 11 == 0 then expire = T0 + 1000000 + i end
			if i == 77 or i % 50 == 0 then xml = big end -- (13 of them: over 1 MB)
			local count, id = db:store(H, user, from, xml, T0 + i, expire, user == "dave" and 40 or nil, nil, meta)
			if user == "dave" and n.dave == 40 then
				lu.assertEquals({ count, id }, { false, "limit" }, "the limit counts the batch's stores")
			else
				n[user] = n[user] + 1
				lu.assertEquals(count, n[user], "store " .. i)
				local list = want[user]
				list[#list + 1] = { T0 + i, expire, from, xml, meta }
			end
		end
		if batched then lu.assertTrue(db:commit()) end
		for _, user in ipairs(users) do
			assert_counter(db, H, user)
			local got = {}
			for _, it in ipairs(db:pop(H, user, T0)) do
				got[#got + 1] = it.xml == "before1" and "before1" or { it.ts, it.expire, it.from, it.xml, it.meta }
			end
			lu.assertEquals(got, want[user], user)
		end
		lu.assertEquals(#want.dave, 40)
	end

	-- A batch over many queues that already exist (sqlite sums their counter
	-- increments per chunk and writes them 32 queues per statement): 300 stores,
	-- 3 to each of 100 users, so the chunk of 256 fills in the middle; every count
	-- the stores return, the counters and the queues' order come out right.
	function T:test_batch_over_many_queues()
		local db = self.db
		local users = {}
		for u = 1, 100 do
			users[u] = "user" .. u
			fill(db, 1, H, users[u], "old")
		end
		local batched = db:begin()
		for round = 1, 3 do
			for u = 1, 100 do
				local count = db:store(H, users[u], FROM, "new" .. round, T0 + round, nil, u == 80 and 3 or nil)
				if u == 80 and round == 3 then -- (store 280: after sqlite wrote the chunk)
					lu.assertEquals(count, false, "the limit counts the batch's own stores")
				else
					lu.assertEquals(count, round + 1, users[u] .. " round " .. round)
				end
			end
		end
		if batched then lu.assertTrue(db:commit()) end
		for u = 1, 100 do
			assert_counter(db, H, users[u])
			local want = u == 80 and { "old1", "new1", "new2" } or { "old1", "new1", "new2", "new3" }
			lu.assertEquals(xmls(db:pop(H, users[u], T0)), want, users[u])
		end
	end

	-- The count a store returns (and the limit) follows every other operation on
	-- the queue, right after it (sqlite answers stores from cached counter rows).
	function T:test_store_counts_after_every_operation()
		local db = self.db
		local ids = fill(db, 3)
		lu.assertEquals(db:remove(H, U, { ids[1] }), 1)
		lu.assertEquals(db:store(H, U, FROM, "after remove", T0), 3)
		lu.assertEquals(#db:pop(H, U, T0), 3)
		lu.assertEquals(db:store(H, U, FROM, "after pop", T0, T0 + 10), 1)
		lu.assertEquals(db:delete_expired(T0 + 10), 1)
		lu.assertEquals(db:store(H, U, FROM, "after expiry", T0), 1)
		lu.assertEquals(db:delete_older_than(T0 + 1), 1)
		lu.assertEquals(db:store(H, U, FROM, "after purge", T0 + 5), 1)
		lu.assertEquals(db:remove_user(H, U), 1)
		lu.assertEquals(db:store(H, U, FROM, "after remove_user", T0 + 5), 1)
		lu.assertEquals(db:remove_host(H), 1)
		lu.assertEquals(db:store(H, U, FROM, "after remove_host", T0 + 5, nil, 1), 1)
		assert_counter(db, H, U)
	end

	function T:test_batch_rollback()
		local db = self.db
		fill(db, 1, H, U, "kept")
		if not db:begin() then
			lu.assertTrue(db:rollback(), "rollback with nothing open does nothing")
			return
		end
		fill(db, 3, H, U, "dropped")
		fill(db, 2, H, "carol", "dropped")
		fill(db, 300, H, "dave", "dropped") -- (more than sqlite writes in a chunk)
		lu.assertTrue(db:rollback())
		lu.assertEquals({ db:count(H, "dave") }, { 0, 0 })
		lu.assertEquals({ db:count(H, U) }, { 1, 5 }, "the counters are rolled back with the rows")
		lu.assertEquals({ db:count(H, "carol") }, { 0, 0 })
		assert_counter(db, H, U)
		local count, id = db:store(H, U, FROM, "after", T0)
		lu.assertEquals(count, 2)
		lu.assertTrue(id > 0)
		lu.assertEquals(xmls(db:pop(H, U, T0)), { "kept1", "after" })
	end


	-- Re-entrancy: Lua code that runs in the middle of a core call (a finalizer, while
	-- pop, list or users build their result tables) and calls the same store again
	-- gets a clear error; the outer call finishes intact. (Before: use after free,
	-- a NULL dereference or a corrupted queue.)
	function T:test_finalizer_reentering_pop_gets_busy_error()
		local db = self.db
		local tree = { name = "message", attr = {}, "nested" }
		local actions = {
			close = function() db:close() end,
			pop = function() db:pop(H, U, T0) end,
			store = function() db:store(H, U, FROM, tree, T0) end,
			list = function() db:list(H, U) end,
			remove_user = function() db:remove_user(H, U) end,
			begin = function() db:begin() end,
		}
		for _, name in ipairs({ "close", "pop", "store", "list", "remove_user", "begin" }) do
			fill(db, 300, H, U, name)
			local errors, items = with_finalizers(db.pop, actions[name], function() return db:pop(H, U, T0) end)
			assert_all_busy(errors, name)
			lu.assertEquals(#items, 300, name)
			for i, it in ipairs(items) do lu.assertEquals(it.xml, name .. i) end
			lu.assertEquals({ db:count(H, U) }, { 0, 0 }, name .. ": the pop took them all")
		end
		lu.assertEquals(db:store(H, U, FROM, "after", T0), 1, "the store works on")
	end

	function T:test_finalizer_reentering_list_and_users_gets_busy_error()
		local db = self.db
		fill(db, 300)
		local errors, items = with_finalizers(db.list, function() db:close() end, function() return db:list(H, U) end)
		assert_all_busy(errors, "close in list")
		lu.assertEquals(#items, 300)
		errors, items = with_finalizers(db.list, function() db:pop(H, U, T0) end, function() return db:list(H, U) end)
		assert_all_busy(errors, "pop in list")
		lu.assertEquals(#items, 300)
		for i = 1, 300 do fill(db, 1, H, "user" .. i) end
		local users
		errors, users = with_finalizers(db.users, function() db:remove_host(H) end, function() return db:users(H) end)
		assert_all_busy(errors, "remove_host in users")
		lu.assertEquals(#users, 301)
		lu.assertEquals(db:count(H, U), 300, "nothing was removed")
	end

	-- db:store serializes a stanza before it touches the store, calling no backend while
	-- Lua code may run: what that code did to the store is checked afterwards.
	function T:test_metamethod_closing_the_store_while_store_serializes()
		local db = self.db
		lu.assertErrorMsgContains("attempt to use a closed offline store", db.store, db, H, U, FROM,
			tree_with_hook(function() db:close() end), T0)
		self.db = open() -- for tearDown
	end

	-- A store from inside another store's serialization has its own buffer: each stanza
	-- is stored as it was written.
	function T:test_metamethod_storing_while_store_serializes()
		local db = self.db
		local done = false
		local outer = tree_with_hook(function()
			if done then return end
			done = true
			assert(db:store(H, U, FROM, { name = "inner", attr = { a = "1" }, "text" }, T0))
			lu.assertEquals(core.serialize({ name = "x", attr = {}, "nested serialize" }), "<x>nested serialize</x>")
		end)
		lu.assertEquals(db:store(H, U, FROM, outer, T0), 2)
		lu.assertEquals(xmls(db:list(H, U)), { "<inner a='1'>text</inner>", HOOKED })
	end

	function T:test_to_be_closed_and_gc()
		local escaped
		do
			local db <close> = open()
			fill(db, 2)
			escaped = db
		end
		lu.assertStrContains(tostring(escaped), "(closed)")
		for _ = 1, 20 do
			local db = open()
			fill(db, 3)
		end
		collectgarbage(); collectgarbage()
	end

	-- Leases (acknowledged delivery): rows handed to a session stay stored, marked with
	-- their owner, until confirmed (deleted) or released (free again, unchanged).
	function T:test_lease_marks_rows_without_deleting_them()
		local db = self.db
		local ids = fill(db, 5)
		local items, held = db:lease(H, U, "n1:1", T0, T0 + 100, 3)
		lu.assertEquals(xmls(items), { "m1", "m2", "m3" })
		lu.assertNil(held)
		lu.assertEquals({ items[1].id, items[1].ts, items[1].from }, { ids[1], T0 + 1, FROM })
		lu.assertNil(items[1].lease_owner, "the items a lease returns are as pop's")
		lu.assertEquals(db:count(H, U), 5, "leased rows are still stored and counted")
		assert_counter(db)
		local listed = db:list(H, U)
		for i = 1, 3 do
			lu.assertEquals({ listed[i].lease_owner, listed[i].lease_until }, { "n1:1", T0 + 100 }, "m" .. i)
		end
		lu.assertEquals({ listed[4].lease_owner, listed[4].lease_until }, { nil, nil }, "a free row has no lease fields")
		lu.assertEquals(xmls(db:lease(H, U, "n1:1", T0, T0 + 100)), { "m4", "m5" },
			"rows already leased by the same owner are in flight: not returned again")
		lu.assertEquals({ db:lease(H, U, "n1:1", T0, T0 + 100) }, { {} })
		lu.assertEquals({ db:lease(H, "nobody", "n1:1", T0, T0 + 100) }, { {} }, "an empty queue")
		lu.assertEquals(#db:lease(H, U, "n1:1", T0, T0 + 100, 0), 0)
	end

	function T:test_live_lease_holds_back_other_owners_and_pop()
		local db = self.db
		local ids = fill(db, 4)
		lu.assertEquals(xmls(db:lease(H, U, "a", T0, T0 + 100, 2)), { "m1", "m2" })
		lu.assertEquals({ db:lease(H, U, "b", T0 + 50, T0 + 150) }, { {}, T0 + 100 },
			"the oldest row is another owner's: nothing, and until when")
		lu.assertEquals({ db:pop(H, U, T0 + 50) }, { {}, 0, T0 + 100 }, "pop neither overtakes nor deletes it")
		lu.assertEquals(db:count(H, U), 4)
		fill(db, 1, H, U, "later")
		lu.assertEquals(db:confirm(H, U, { ids[1], ids[2] }), 2, "confirm deletes the acked rows")
		lu.assertEquals(db:count(H, U), 3)
		assert_counter(db)
		lu.assertEquals(xmls(db:lease(H, U, "b", T0 + 50, T0 + 150)), { "m3", "m4", "later1" },
			"rows stored during a lease queue behind it")
		lu.assertEquals(db:confirm(H, U, { ids[1] }), 0, "an acked row is gone")
	end

	function T:test_expired_lease_frees_its_rows()
		local db = self.db
		fill(db, 3)
		lu.assertEquals(xmls(db:lease(H, U, "a", T0, T0 + 10, 1)), { "m1" })
		lu.assertEquals(xmls(db:lease(H, U, "a", T0, T0 + 100, 1)), { "m2" })
		-- at T0 + 10 m1's lease has run out (lease_until <= now), m2's lives
		lu.assertEquals({ xmls(db:lease(H, U, "b", T0 + 10, T0 + 200)), (db:count(H, U)) }, { { "m1" }, 3 },
			"the free head goes to another owner, who stops at the next live lease")
		local items, expired, held = db:pop(H, U, T0 + 150)
		lu.assertEquals({ #items, expired, held }, { 0, 0, T0 + 200 })
		items, expired, held = db:pop(H, U, T0 + 200)
		lu.assertEquals({ xmls(items), expired, held }, { { "m1", "m2", "m3" }, 0, nil },
			"every lease ran out: pop takes all, in order")
		lu.assertEquals(db:count(H, U), 0)
	end

	-- A backlog drained in pages behind a long run of expired rows: every page returns at
	-- most max, the expired rows go, and the live ones all come out once, in order (a
	-- backend may end a page short after passing over many rows; the next call goes on).
	function T:test_paged_pop_and_lease_behind_many_expired_rows()
		local db = self.db
		for _, how in ipairs { "pop", "lease" } do
			local user = "paged-" .. how
			fill(db, 1100, H, user, "x", { expire = T0 + 5000 })
			fill(db, 25, H, user, "m")
			local got, calls = {}, 0
			repeat
				calls = calls + 1
				local items = how == "pop" and db:pop(H, user, T0 + 10000, 10)
					or db:lease(H, user, "o", T0 + 10000, T0 + 20000, 10)
				lu.assertTrue(#items <= 10, how)
				for _, it in ipairs(items) do got[#got + 1] = it.xml end
				if how == "lease" and items[1] then
					local ids = {}
					for i, it in ipairs(items) do ids[i] = it.id end
					lu.assertEquals(db:confirm(H, user, ids), #ids)
				end
			until #got >= 25 or calls > 20
			local want = {}
			for i = 1, 25 do want[i] = "m" .. i end
			lu.assertEquals(got, want, how)
			lu.assertEquals(db:count(H, user), 0, how .. ": the expired rows went too")
		end
	end

	function T:test_pop_stops_at_a_live_lease_behind_free_rows()
		local db = self.db
		fill(db, 4)
		lu.assertEquals(xmls(db:lease(H, U, "a", T0, T0 + 10, 1)), { "m1" })
		lu.assertEquals(xmls(db:lease(H, U, "a", T0, T0 + 100, 2)), { "m2", "m3" })
		local items, expired, held = db:pop(H, U, T0 + 20)
		lu.assertEquals({ xmls(items), expired, held }, { { "m1" }, 0, nil }, "pop takes the free head only")
		lu.assertEquals(xmls(db:list(H, U)), { "m2", "m3", "m4" })
		assert_counter(db)
	end

	function T:test_release_gives_rows_back_unchanged()
		local db = self.db
		assert(db:store(H, U, FROM, "plain", T0 + 1))
		assert(db:store(H, U, "carol@example.org", "<x/>", T0 + 2, T0 + 9999, nil, nil, "meta"))
		assert(db:store(H, U, FROM, "third", T0 + 3, nil, nil, nil, nil, "dedup-3"))
		assert(db:store(H, "carol", FROM, "carol's", T0 + 4))
		local before = db:list(H, U)
		lu.assertEquals(#db:lease(H, U, "a", T0, T0 + 100), 3)
		lu.assertEquals(#db:lease(H, "carol", "a", T0, T0 + 100), 1)
		lu.assertEquals(db:release(H, U, "b"), 0, "another owner's release")
		lu.assertEquals(db:release(H, U, "a"), 3)
		lu.assertEquals(db:list(H, U), before, "same ids, stamps, expiry, sender, meta; no lease")
		lu.assertEquals(db:list(H, "carol")[1].lease_owner, "a", "another user's lease stays")
		lu.assertEquals(db:release(H, U, "a"), 0)
		local again = db:lease(H, U, "b", T0, T0 + 100)
		lu.assertEquals(xmls(again), { "plain", "<x/>", "third" }, "released rows go out again in order")
		lu.assertEquals({ again[2].id, again[2].ts, again[2].expire, again[2].meta, again[2].from },
			{ before[2].id, T0 + 2, T0 + 9999, "meta", "carol@example.org" })
		assert_counter(db)
	end

	function T:test_release_all_and_renew_by_owner_prefix()
		local db = self.db
		fill(db, 2, H, "u1"); fill(db, 2, H, "u2"); fill(db, 2, "other.org", "u3"); fill(db, 1, H, "u4")
		lu.assertEquals(#db:lease(H, "u1", "n1:1", T0, T0 + 10), 2)
		lu.assertEquals(#db:lease(H, "u2", "n1:2", T0, T0 + 10), 2)
		lu.assertEquals(#db:lease("other.org", "u3", "n2:1", T0, T0 + 10), 2)
		lu.assertEquals(#db:lease(H, "u4", "n1", T0, T0 + 10), 1)
		lu.assertEquals(db:renew("n1:", T0 + 1000), 4, "n1:1 and n1:2, not n1 nor n2:1")
		lu.assertEquals(db:list(H, "u1")[2].lease_until, T0 + 1000)
		lu.assertEquals(db:list(H, "u4")[1].lease_until, T0 + 10)
		lu.assertEquals({ db:lease(H, "u2", "x", T0 + 500, T0 + 600) }, { {}, T0 + 1000 }, "renewed: still held")
		lu.assertEquals(#db:lease("other.org", "u3", "x", T0 + 500, T0 + 600), 2, "not renewed: ran out")
		lu.assertEquals(db:release_all("n1:"), 4)
		lu.assertNil(db:list(H, "u1")[1].lease_owner)
		lu.assertEquals(db:list(H, "u4")[1].lease_owner, "n1")
		lu.assertEquals(db:release_all("zzz"), 0)
		fill(db, 1, H, "u5")
		lu.assertEquals(#db:lease(H, "u5", "", T0, T0 + 10), 1, "the empty owner is an owner")
		lu.assertEquals(db:renew("", T0 + 5), 4, "the empty prefix: every lease")
		lu.assertEquals(db:list(H, "u5")[1].lease_until, T0 + 5)
		lu.assertEquals(db:release_all(""), 4)
		lu.assertEquals(#db:lease(H, "u5", "", T0, T0 + 10), 1)
		lu.assertEquals(#db:lease(H, "u4", "n1", T0, T0 + 10), 1)
		lu.assertEquals(#db:lease("other.org", "u3", "x", T0, T0 + 10), 2)
		lu.assertEquals(db:release(H, "u5", ""), 1)
		lu.assertEquals(db:release_all(), 3)
		lu.assertEquals(db:release_all(), 0)
		for _, k in ipairs({ { H, "u1" }, { H, "u2" }, { "other.org", "u3" }, { H, "u4" } }) do
			for _, it in ipairs(db:list(k[1], k[2])) do lu.assertNil(it.lease_owner) end
			assert_counter(db, k[1], k[2])
		end
	end

	function T:test_leased_rows_count_and_go_with_every_removal()
		local db = self.db
		fill(db, 3, H, U, "m", { max = 3 })
		lu.assertEquals(#db:lease(H, U, "a", T0, T0 + 100), 3)
		lu.assertEquals({ db:store(H, U, FROM, "over", T0, nil, 3) }, { false, "limit", 3 },
			"leased rows count toward the limit until deleted")
		lu.assertEquals({ db:count(H, U) }, { 3, 6 })
		lu.assertEquals(db:remove_user(H, U), 3)
		assert(db:store(H, U, FROM, "exp", T0, T0 + 5))
		assert(db:store(H, U, FROM, "old", T0 - 100))
		assert(db:store(H, U, FROM, "host", T0))
		lu.assertEquals(#db:lease(H, U, "a", T0, T0 + 100), 3)
		lu.assertEquals(db:delete_expired(T0 + 5), 1)
		lu.assertEquals(db:delete_older_than(T0), 1)
		lu.assertEquals(db:remove_host(H), 1)
		lu.assertEquals({ db:count(H, U) }, { 0, 0 })
		lu.assertEquals(db:release(H, U, "a"), 0)
	end

	function T:test_lease_deletes_expired_rows_and_skips_set_aside()
		local db = self.db
		assert(db:store(H, U, FROM, "gone", T0, T0 + 10))
		assert(db:store(H, U, FROM, "<damaged", T0, nil, nil, nil, core.SET_ASIDE))
		assert(db:store(H, U, FROM, "keep", T0, T0 + 1000))
		assert(db:store(H, U, FROM, "gone2", T0, T0 + 20))
		assert(db:store(H, U, FROM, "last", T0))
		lu.assertEquals({ xmls(db:lease(H, U, "a", T0 + 500, T0 + 600)) }, { { "keep", "last" } })
		lu.assertEquals(xmls(db:list(H, U)), { "<damaged", "keep", "last" }, "expired rows deleted as pop does")
		assert_counter(db)
		lu.assertNil(db:list(H, U)[1].lease_owner, "a set-aside row is never leased")
		lu.assertEquals({ db:lease(H, U, "b", T0 + 500, T0 + 600) }, { {}, T0 + 600 })
		lu.assertEquals(db:release(H, U, "a"), 2)
		lu.assertEquals(xmls(db:pop(H, U, T0 + 500)), { "keep", "last" })
	end

	function T:test_lease_methods_check_arguments_and_batch()
		local db = self.db
		lu.assertError(db.lease, db, H, U, nil, T0, T0 + 1)
		lu.assertError(db.lease, db, H, U, "a", nil, T0 + 1)
		lu.assertError(db.lease, db, H, U, "a", T0, nil)
		lu.assertError(db.lease, db, H, U, "a", T0, T0 + 1, -1)
		lu.assertError(db.release, db, H, U, nil)
		lu.assertError(db.renew, db, nil, T0)
		lu.assertError(db.renew, db, "a", nil)
		lu.assertError(db.release_all, db, {})
		lu.assertError(db.confirm, db, H, U, { "x" })
		lu.assertError(db.store, db, H, U, FROM, "x", T0, nil, nil, nil, nil, {})
		if db:begin() then
			for name, args in pairs({ lease = { H, U, "a", T0, T0 + 1 }, confirm = { H, U, {} },
				release = { H, U, "a" }, release_all = {}, renew = { "a", T0 } }) do
				lu.assertErrorMsgContains("a batch is open", db[name], db, table.unpack(args))
			end
			lu.assertTrue(db:commit())
		end
		db:close()
		lu.assertErrorMsgContains("closed", db.lease, db, H, U, "a", T0, T0 + 1)
		self.db = open()
	end

	function T:test_finalizer_reentering_lease_gets_busy_error()
		local db = self.db
		fill(db, 300)
		local errors, items = with_finalizers(db.lease, function() db:release(H, U, "a") end,
			function() return db:lease(H, U, "a", T0, T0 + 100) end)
		assert_all_busy(errors, "release in lease")
		lu.assertEquals(#items, 300)
		lu.assertEquals(db:list(H, U)[300].lease_owner, "a")
	end

	-- Duplicates: a store with a dedup key the user's queue already holds stores nothing.
	function T:test_dedup_refuses_the_same_key_twice()
		local db = self.db
		local A1, B1 = "alice@example.org\0o1", "carol@example.org\0o1"
		lu.assertEquals(db:store(H, U, FROM, "first", T0, nil, nil, nil, nil, A1), 1)
		lu.assertEquals({ db:store(H, U, FROM, "again", T0, nil, nil, nil, nil, A1) }, { false, "duplicate", 1 })
		lu.assertEquals(db:store(H, U, FROM, "other sender", T0, nil, nil, nil, nil, B1), 2)
		lu.assertEquals(db:store(H, "carol", FROM, "other user", T0, nil, nil, nil, nil, A1), 1)
		lu.assertEquals(db:store(H, U, FROM, "no key", T0), 3)
		lu.assertEquals(db:store(H, U, FROM, "no key", T0), 4, "without a key nothing is a duplicate")
		lu.assertEquals({ db:store(H, U, FROM, "full", T0, nil, 4, nil, nil, A1) }, { false, "duplicate", 4 },
			"a duplicate is a duplicate even when the queue is full")
		lu.assertEquals({ db:store(H, U, FROM, "full", T0, nil, 4, nil, nil, "new") }, { false, "limit", 4 })
		lu.assertEquals({ db:count(H, U) }, { 4, #"first" + #"other sender" + 2 * #"no key" })
		lu.assertEquals(xmls(db:list(H, U)), { "first", "other sender", "no key", "no key" })
		assert_counter(db)
	end

	function T:test_dedup_sees_leased_and_set_aside_rows_and_forgets_deleted_ones()
		local db = self.db
		local _, id1 = assert(db:store(H, U, FROM, "a", T0, nil, nil, nil, nil, "k1"))
		assert(db:store(H, U, FROM, "<bad", T0, nil, nil, nil, core.SET_ASIDE, "k2"))
		assert(db:store(H, U, FROM, "c", T0, nil, nil, nil, nil, "k3"))
		lu.assertEquals(#db:lease(H, U, "n:1", T0, T0 + 100), 2)
		lu.assertEquals({ db:store(H, U, FROM, "x", T0, nil, nil, nil, nil, "k1") }, { false, "duplicate", 3 }, "leased")
		lu.assertEquals({ db:store(H, U, FROM, "x", T0, nil, nil, nil, nil, "k2") }, { false, "duplicate", 3 }, "set aside")
		lu.assertEquals(db:release(H, U, "n:1"), 2)
		lu.assertEquals({ db:store(H, U, FROM, "x", T0, nil, nil, nil, nil, "k3") }, { false, "duplicate", 3 },
			"a released row keeps its key")
		lu.assertEquals(db:confirm(H, U, { id1 }), 1)
		lu.assertEquals(db:store(H, U, FROM, "a again", T0, nil, nil, nil, nil, "k1"), 3,
			"a deleted row's key is forgotten")
		lu.assertEquals(xmls(db:pop(H, U, T0)), { "c", "a again" })
		lu.assertEquals(db:store(H, U, FROM, "c again", T0, nil, nil, nil, nil, "k3"), 2)
		lu.assertEquals(db:remove_user(H, U), 2)
		lu.assertEquals(db:store(H, U, FROM, "bad again", T0, nil, nil, nil, nil, "k2"), 1)
		assert(db:store(H, U, FROM, "e", T0, T0 + 1, nil, nil, nil, "k4"))
		lu.assertEquals(db:delete_expired(T0 + 1), 1)
		lu.assertEquals(db:store(H, U, FROM, "e again", T0, nil, nil, nil, nil, "k4"), 2)
		lu.assertEquals(db:remove_host(H), 2)
		lu.assertEquals(db:store(H, U, FROM, "z", T0, nil, nil, nil, nil, "k4"), 1)
		lu.assertEquals(db:delete_older_than(T0 + 1), 1)
		lu.assertEquals(db:store(H, U, FROM, "z", T0, nil, nil, nil, nil, "k4"), 1)
		lu.assertEquals(db:list(H, U)[1].dedup, nil, "the key is not part of the item")
	end

	-- In a batch (sqlite), a key is found among the rows the batch itself holds back
	-- (written a chunk at a time), among rows of the batch already written, and among
	-- committed rows; a duplicate leaves the batch open.
	function T:test_dedup_inside_a_batch()
		local db = self.db
		assert(db:store(H, U, FROM, "committed", T0, nil, nil, nil, nil, "old"))
		local batched = db:begin()
		lu.assertEquals({ db:store(H, U, FROM, "x", T0, nil, nil, nil, nil, "old") }, { false, "duplicate", 1 })
		lu.assertEquals(db:store(H, U, FROM, "new", T0, nil, nil, nil, nil, "new"), 2)
		lu.assertEquals({ db:store(H, U, FROM, "x", T0, nil, nil, nil, nil, "new") }, { false, "duplicate", 2 },
			"a row pending in the same batch")
		lu.assertEquals(db:store(H, "carol", FROM, "new", T0, nil, nil, nil, nil, "new"), 1)
		for i = 1, 300 do
			lu.assertEquals(db:store(H, "dave", FROM, "d" .. i, T0, nil, nil, nil, nil, "d" .. i), i)
		end
		for i = 1, 300, 7 do
			lu.assertEquals({ db:store(H, "dave", FROM, "again", T0, nil, nil, nil, nil, "d" .. i) },
				{ false, "duplicate", 300 }, "d" .. i)
		end
		lu.assertEquals(db:store(H, U, FROM, "after", T0), 3, "the batch goes on")
		lu.assertTrue(db:commit())
		lu.assertEquals(xmls(db:list(H, U)), { "committed", "new", "after" })
		lu.assertEquals(db:count(H, "dave"), 300)
		assert_counter(db, H, "dave")
		if batched then
			assert(db:begin())
			lu.assertEquals({ db:store(H, "dave", FROM, "x", T0, nil, nil, nil, nil, "d300") }, { false, "duplicate", 300 })
			lu.assertEquals(db:store(H, "dave", FROM, "x", T0, nil, nil, nil, nil, "d301"), 301)
			lu.assertTrue(db:rollback())
			lu.assertEquals(db:store(H, "dave", FROM, "x", T0, nil, nil, nil, nil, "d301"), 301,
				"a rolled back row's key is forgotten")
		end
	end

	return T
end

TestContractMemory = contract(function() return assert(core.open_memory()) end)

local sqlite_dir, sqlite_files = nil, 0
TestContractSqlite = contract(function()
	sqlite_dir = sqlite_dir or support.tmpdir()
	sqlite_files = sqlite_files + 1
	return assert(core.open_sqlite(("%s/%d.sqlite"):format(sqlite_dir, sqlite_files)))
end, function()
	if sqlite_dir then support.rmrf(sqlite_dir) end
	sqlite_dir = nil
end)

-- A throwaway PostgreSQL (spec/support/postgres.lua), a fresh schema per store. Fails when the
-- server cannot be started; skipped, visibly, only with OFFLINE_STORE_SKIP_POSTGRES=1.
TestContractPostgres = contract(function()
	local srv = require("support.postgres").require_server(lu)
	return assert(core.open_postgres((srv:fresh_conninfo())))
end)

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
