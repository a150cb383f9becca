-- Acknowledged delivery and paged drain through the real Prosody with mod_smacks on: a backlog
-- whose delivery is cut off (connection lost, server killed, second resource) loses nothing;
-- the session's unacked queue never holds more than a page; a resumed session keeps its lease;
-- the same origin-id from the same sender is stored once.
-- Backlogs are written to the store file with the server stopped (thousands of rows in one
-- transaction, instead of as many messages through a client).

local lu = require "luaunit"
local offline = require "support.offline"
local xmpp = require "support.xmpp"
local core = require "offline_store.core"
local socket = require "socket"

local login, online, chat = offline.login, offline.online, offline.chat
local ids, delays = offline.ids, offline.delays

local HIBERNATE = 2 -- smacks_hibernation_time of these servers, seconds
local PAGE = 100 -- offline_delivery_page's default
local NS_SM = "urn:xmpp:sm:3"
local NS_SID = "urn:xmpp:sid:0"

local USERS = {}
for _, u in ipairs { "alice", "carol", "b1", "b2", "b3", "b4", "b5", "b6", "b7" } do USERS[u] = offline.PW end

-- SPEC_BACKEND=memory runs these on the memory store (backlogs sent by a client, no restart).
local BACKEND = os.getenv("SPEC_BACKEND") or "sqlite"

local function start()
	return offline.start {
		users = USERS,
		modules_enabled = { "smacks" },
		global = "smacks_hibernation_time = " .. HIBERNATE,
		host = 'access = { max_user_offline_messages = { { acl = "all", value = "infinity" } } }\n'
			.. ("offline_backend = %q"):format(BACKEND),
	}
end

-- Writes `n` messages m1..mn for `user` into the store with the server stopped, then starts
-- it again. They were stored an hour ago, one microsecond apart.
local function fill(srv, user, n)
	if BACKEND == "memory" then
		local a = online(srv, "alice")
		for i = 1, n do
			a:send(chat(user .. "@localhost", "m" .. i, tostring(i)))
			if i % 500 == 0 then a:ping() end
		end
		a:ping()
		a:close()
		return
	end
	srv:stop()
	local db = assert(core.open_sqlite(srv.dir .. "/data/offline.sqlite"))
	local ok, err = pcall(function()
		local t0 = (os.time() - 3600) * 1000000
		assert(db:begin())
		for i = 1, n do
			assert(db:store("localhost", user, "alice@localhost/r",
				("<message xmlns='jabber:client' from='alice@localhost/r' to='%s@localhost' type='chat' id='m%d'>"
					.. "<body>%d</body></message>"):format(user, i, i), t0 + i))
		end
		assert(db:commit())
	end)
	db:close()
	srv:restart()
	assert(ok, err)
end

local function range(a, b)
	local out = {}
	for i = a, b do out[#out + 1] = "m" .. i end
	return out
end

-- The index after "m" of a delivered id.
local function num(id) return tonumber(id:match("^m(%d+)$")) end

-- A login with XEP-0198 (resumable) enabled before initial presence, as mobile clients do.
local function sm_login(srv, user, resource, opts)
	local c = login(srv, user, resource)
	assert(c:enable_sm(opts))
	c:presence()
	return c
end

-- A plain login (no XEP-0198) that reads everything delivered until nothing comes for `quiet`
-- seconds; returns the ids.
local function plain_drain(srv, user, quiet)
	local c = login(srv, user, "plain" .. math.random(1e9))
	c:presence()
	local got = c:read_messages(math.huge, quiet or 1.5, 120)
	c:close()
	return ids(got), got
end

-- How many hibernating sessions mod_smacks has destroyed (its timeout) since the server started.
local function hibernation_ends(srv)
	local _, n = srv:log():gsub("Destroying session for hibernating too long", "")
	return n
end

-- Waits until mod_smacks has destroyed `n` hibernating sessions in all.
local function wait_hibernation_over(srv, n)
	local deadline = socket.gettime() + HIBERNATE + 10
	repeat
		socket.sleep(0.2)
		if hibernation_ends(srv) >= n then socket.sleep(0.5); return end
	until socket.gettime() > deadline
	error("the hibernating session was not destroyed in time")
end

-- The counts of each id in a list, and the ids seen more than once.
local function twice(list)
	local seen, dup = {}, {}
	for _, id in ipairs(list) do
		if seen[id] then dup[#dup + 1] = id end
		seen[id] = true
	end
	return dup
end

---------------------------------------------------------------------------------------------------
TestAcked = {}

function TestAcked:server()
	if not TestAcked.srv then TestAcked.srv = start() end
	return TestAcked.srv
end

function TestAcked.teardownClass()
	if TestAcked.srv then TestAcked.srv:cleanup(); TestAcked.srv = nil end
end

-- 1. 2,000 queued; the client reads part of the backlog, acks some, and its TCP connection
-- dies; after the hibernation timeout a plain login gets every message not acked, once each,
-- in order, each with one delay.
function TestAcked:test_1_connection_lost_loses_nothing()
	local srv = self:server()
	fill(srv, "b1", 2000)
	local c = sm_login(srv, "b1", "phone")
	local first = c:read_messages(300, 1)
	lu.assertTrue(#first >= 50, "the client got part of the backlog (" .. #first .. ")")
	lu.assertEquals(ids(first), range(1, #first), "in order")
	local acked = 50
	c:ack(first[acked].sm_h) -- acks the first 50 only
	c:ping()
	local destroyed = hibernation_ends(srv)
	c:drop()
	wait_hibernation_over(srv, destroyed + 1)
	local got, stanzas = plain_drain(srv, "b1")
	lu.assertEquals(#twice(got), 0, "nothing twice")
	lu.assertEquals(#got, 2000 - acked, "every message not acked, and only those")
	lu.assertEquals(got, range(acked + 1, 2000), "in their order")
	lu.assertEquals(#delays(stanzas[1]), 1, "one delay")
	lu.assertEquals(#delays(stanzas[#stanzas]), 1, "one delay")
	lu.assertEquals(#plain_drain(srv, "b1", 0.5), 0, "all delivered now")
end

-- 2. Same, but the server is SIGKILLed mid-delivery and restarted: nothing lost, and the only
-- messages delivered twice are those sent and not acked (at most a page).
function TestAcked:test_2_server_killed_loses_nothing()
	if BACKEND == "memory" then lu.skip("the memory store does not outlive the process") end
	local srv = self:server()
	fill(srv, "b2", 2000)
	local c = sm_login(srv, "b2", "phone")
	local got1 = ids(c:read_messages(PAGE, 1))
	lu.assertEquals(got1, range(1, #got1))
	c:ack() -- acks everything read so far
	local acked = #got1
	local got2 = ids(c:ping()) -- read on, never acked
	for _, id in ipairs(ids(c:read_messages(3 * PAGE, 1))) do got2[#got2 + 1] = id end
	srv:kill()
	c:drop()
	srv:restart()
	local after = plain_drain(srv, "b2")
	lu.assertEquals(#twice(after), 0, "nothing twice at the new login")
	lu.assertEquals(after, range(acked + 1, 2000), "every message not acked, in order: none lost")
	lu.assertTrue(#got2 <= PAGE, "at most a page was delivered and not acked (" .. #got2 .. ")")
end

-- 3. A client that acks as it goes (every 10 stanzas and every <r/>) gets each message once, in
-- order; a client that withholds its acks never has more than a page unacked.
function TestAcked:test_3_acks_as_it_goes_and_a_page_at_most_unacked()
	local srv = self:server()
	fill(srv, "b3", 1000)
	local c = sm_login(srv, "b3", "phone", { auto_ack = true, ack_every = 10 })
	local got = ids(c:read_messages(1000, 2))
	lu.assertEquals(got, range(1, 1000), "each once, in order")
	c:close()
	lu.assertEquals(#plain_drain(srv, "b3", 0.5), 0, "acked messages are gone")

	fill(srv, "b3", 1000)
	c = sm_login(srv, "b3", "phone")
	local total, pages = 0, 0
	while total < 1000 do
		local page = c:read_messages(1000, 0.5) -- everything the server sends before it waits
		lu.assertTrue(#page > 0, "the server sends the next page after the ack (at " .. total .. ")")
		lu.assertTrue(#page <= PAGE, "at most a page unacked (got " .. #page .. ")")
		if pages == 0 then -- mod_smacks' own count, through the admin shell
			local ok, out = srv:prosodyctl("shell", "c2s:show(nil, 'jid smacks_queue')")
			lu.assertTrue(ok, out)
			local unacked = tonumber(out:match("b3@localhost/phone[%s|]+(%d+)"))
			lu.assertNotNil(unacked, out)
			lu.assertTrue(unacked <= PAGE + 1, "mod_smacks' queue holds a page at most (+ the self-presence): " .. unacked)
		end
		lu.assertEquals(ids(page), range(total + 1, total + #page))
		lu.assertNotNil(c:wait_for(function(e) return e.name == "r" and e.attr.xmlns == NS_SM end, 1),
			"an ack is requested after each page")
		total, pages = total + #page, pages + 1
		c:ack()
	end
	lu.assertEquals(total, 1000)
	lu.assertTrue(pages >= 1000 / PAGE)
	c:close()
end

-- 4. Resumption: the session resumes and the rest of the backlog arrives; nothing twice.
function TestAcked:test_4_resumed_session_keeps_its_lease()
	local srv = self:server()
	fill(srv, "b4", 2000)
	local c = sm_login(srv, "b4", "phone")
	local first = ids(c:read_messages(PAGE, 1))
	lu.assertEquals(first, range(1, #first))
	c:ack() -- (h = what was read; the rest of the page, if any, is re-sent at resume)
	for _, id in ipairs(ids(c:ping())) do first[#first + 1] = id end -- (the next page may be on its way)
	local h, previd = c.sm_h, c.sm_id
	c:drop()
	socket.sleep(0.3)
	local r = assert(xmpp.connect { port = srv.c2s_port, user = "b4", password = offline.PW,
		resume = { previd = previd, h = h }, auto_ack = true })
	local rest = ids(r:read_messages(2000, 2))
	local all = {}
	for _, id in ipairs(first) do all[#all + 1] = id end
	for _, id in ipairs(rest) do all[#all + 1] = id end
	lu.assertEquals(#twice(all), 0, "nothing twice")
	lu.assertEquals(all, range(1, 2000), "the rest arrives on the resumed session, in order")
	r:close()
	lu.assertEquals(#plain_drain(srv, "b4", 0.5), 0, "nothing left, nothing put back")
end

-- 5. Two resources: what one holds unacked is not delivered to the other while it lives; when
-- the first dies, the other gets everything it did not ack, in order.
function TestAcked:test_5_second_resource_waits_for_the_lease()
	local srv = self:server()
	fill(srv, "b5", 2000)
	local phone = sm_login(srv, "b5", "phone")
	local first_page = phone:read_messages(PAGE, 1)
	lu.assertEquals(ids(first_page), range(1, #first_page))
	phone:ack(first_page[40].sm_h) -- acks 40 only
	phone:ping()
	local laptop = login(srv, "b5", "laptop")
	laptop:presence()
	local early = ids(laptop:read_messages(2000, 1))
	lu.assertEquals(early, {}, "nothing behind another session's lease")
	local destroyed = hibernation_ends(srv)
	phone:drop()
	wait_hibernation_over(srv, destroyed + 1)
	local got2 = ids(laptop:read_messages(2000, 2, 30))
	lu.assertEquals(got2, range(41, 2000), "the released rows and the rest go to the other resource")
	laptop:close()
end

-- 6. Without XEP-0198: delivered = written, in pages; 100,000 messages arrive at one login.
function TestAcked:test_6_plain_login_drains_a_large_backlog_in_pages()
	local srv = self:server()
	local N = tonumber(os.getenv("DRAIN_N") or "") or 100000
	fill(srv, "b6", N)
	local rss0 = offline.rss_kib(srv:pid())
	local c = login(srv, "b6", "plain")
	local count, last, ordered = 0, 0, true
	c.sink = function(m)
		count = count + 1
		local n = num(m.attr.id)
		if n ~= last + 1 then ordered = false end
		last = n
	end
	c:presence()
	local t0 = socket.gettime()
	local peak = rss0
	while count < N do
		local before = count
		c:collect(0.5)
		peak = math.max(peak, offline.rss_kib(srv:pid()) or 0)
		if count == before then break end
	end
	local secs = socket.gettime() - t0
	c:close()
	io.stderr:write(("\n[drain] %d messages without XEP-0198 in %.1f s; server VmRSS %d KiB before, peak sampled %d KiB\n")
		:format(count, secs, rss0, peak))
	lu.assertEquals(count, N, "the whole backlog at one login")
	lu.assertTrue(ordered, "in order")
	lu.assertEquals(#plain_drain(srv, "b6", 0.5), 0, "delivered = written: nothing left")
end

-- 7. The same origin-id from the same sender twice: stored once, no error to the sender; from
-- two senders: both stored.
function TestAcked:test_7_origin_id_duplicates_stored_once()
	local srv = self:server()
	local a = online(srv, "alice")
	local c = online(srv, "carol")
	local function with_origin(id)
		return function(m) m:tag("body"):text("hi"):up():tag("origin-id", { xmlns = NS_SID, id = id }):up() end
	end
	a:send(chat("b7@localhost", "x1", nil, with_origin("o-1")))
	a:send(chat("b7@localhost", "x2", nil, with_origin("o-1"))) -- a resend after a reconnect
	c:send(chat("b7@localhost", "y1", nil, with_origin("o-1"))) -- another sender, same id
	a:send(chat("b7@localhost", "x3", nil, with_origin("o-2")))
	a:send(chat("b7@localhost", "x4", "no origin-id"))
	a:send(chat("b7@localhost", "x5", "no origin-id"))
	lu.assertEquals(offline.messages(a:ping()), {}, "the sender gets no error")
	lu.assertEquals(offline.messages(c:ping()), {}, "the sender gets no error")
	local got = plain_drain(srv, "b7", 0.8)
	table.sort(got)
	lu.assertEquals(got, { "x1", "x3", "x4", "x5", "y1" })
	a:close(); c:close()
end

---------------------------------------------------------------------------------------------------
-- 8. PostgreSQL, two nodes: node A dies (SIGKILL) holding a lease; once the lease has expired
-- node B delivers what A held, and nothing acked is delivered again.
TestAckedTwoNodes = {}

local LEASE = 10 -- offline_delivery_lease of these nodes (its minimum)

function TestAckedTwoNodes.teardownClass()
	for _, k in ipairs { "a", "b" } do
		if TestAckedTwoNodes[k] then TestAckedTwoNodes[k]:cleanup(); TestAckedTwoNodes[k] = nil end
	end
end
TestAckedTwoNodes.tearDown = TestAckedTwoNodes.teardownClass

-- A server on a fresh PostgreSQL database (pg, db) with offline_node = name.
local function pg_node(pg, db, name)
	return offline.start {
		users = USERS,
		modules_enabled = { "smacks" },
		global = "smacks_hibernation_time = " .. HIBERNATE,
		host = ('offline_backend = "postgres"\noffline_postgres = %q\noffline_node = %q\noffline_delivery_lease = %d\n'
			.. 'access = { max_user_offline_messages = { { acl = "all", value = "infinity" } } }')
			:format(("host=127.0.0.1 port=%d dbname=%s user=postgres sslmode=disable"):format(pg.port, db), name, LEASE),
	}
end

function TestAckedTwoNodes:test_8_dead_nodes_lease_expires_to_the_other_node()
	local postgres = require "support.postgres"
	local pg = postgres.require_server(lu)
	local db = pg:fresh_database()
	local function node(name) return pg_node(pg, db, name) end
	local a, b = node("node-a"), node("node-b")
	TestAckedTwoNodes.a, TestAckedTwoNodes.b = a, b
	local alice = online(a, "alice")
	for i = 1, 300 do alice:send(chat("b1@localhost", "m" .. i, tostring(i))) end
	alice:ping()
	alice:close()
	local phone = sm_login(a, "b1", "phone")
	local page = phone:read_messages(PAGE, 1)
	lu.assertEquals(ids(page), range(1, PAGE))
	phone:ack(page[40].sm_h)
	phone:ping()
	local killed_at = socket.gettime()
	a:kill()
	phone:drop()
	local laptop = login(b, "b1", "laptop")
	laptop:presence()
	local early = ids(laptop:read_messages(300, 1))
	lu.assertEquals(early, {}, "nothing behind node A's live lease")
	local first = laptop:wait_for(function(e) return e.name == "message" end, LEASE + 60)
	lu.assertNotNil(first, "node B delivers in the end")
	local got = ids(laptop:read_messages(300, 3))
	table.insert(got, 1, first.attr.id)
	local waited = socket.gettime() - killed_at
	lu.assertEquals(got, range(41, 300), "after the lease expired, node B delivers what A held and the rest")
	lu.assertTrue(waited >= LEASE - 1, "not before the lease expired (" .. waited .. " s)")
	laptop:close()
	lu.assertEquals(#plain_drain(b, "b1", 0.5), 0, "nothing twice")
end

-- 9. PostgreSQL, two servers started with the same offline_node (a misconfiguration): the
-- second leaves the leases of the first, which is alive, alone and says which option to fix.
function TestAckedTwoNodes:test_9_a_twin_node_leaves_live_leases_alone()
	local pg = require "support.postgres".require_server(lu)
	local db = pg:fresh_database()
	local a = pg_node(pg, db, "twin")
	TestAckedTwoNodes.a = a
	local alice = online(a, "alice")
	for i = 1, 150 do alice:send(chat("b2@localhost", "m" .. i, tostring(i))) end
	alice:ping()
	alice:close()
	local phone = sm_login(a, "b2", "phone")
	lu.assertEquals(ids(phone:read_messages(PAGE, 1)), range(1, PAGE), "a page leased to the phone, not acked")
	local b = pg_node(pg, db, "twin")
	TestAckedTwoNodes.b = b
	local deadline = socket.gettime() + 10
	while not b:log():find("Another running server uses offline_node", 1, true) and socket.gettime() < deadline do
		socket.sleep(0.1)
	end
	local laptop = login(b, "b2", "laptop")
	laptop:presence()
	lu.assertEquals(ids(laptop:read_messages(300, 1.5)), {}, "nothing behind the phone's live lease")
	laptop:close()
	lu.assertStrContains(b:log(), 'Another running server uses offline_node = "twin"')
	phone:close()
end
