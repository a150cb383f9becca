-- Two real Prosody nodes on one PostgreSQL (offline_backend = "postgres"): a message stored
-- through node A is delivered at login on node B, limits hold across both (also when both
-- store at once), a PostgreSQL outage gives the sender the storage-failure error and the
-- nodes reconnect by themselves, and a bad offline_postgres stops the module at load. Messages
-- read at once are stored in one transaction (group commit).
-- A database away when Prosody starts: the module comes up, answers with the storage-failure
-- error, and opens the store by itself once the database is there.
-- Node A uses a connection string, node B a Prosody-style sql table, on the same database.
-- A network gone silent between Prosody and PostgreSQL: the server keeps answering at once.

local lu = require "luaunit"
local offline = require "support.offline"
local postgres = require "support.postgres"
local policy = require "offline_store.policy"
local socket = require "socket"

local format = string.format
local online, chat, ids, delays, messages, collect_offline =
	offline.online, offline.chat, offline.ids, offline.delays, offline.messages, offline.collect_offline
local error_of = offline.error_of

local function host_config(offline_postgres)
	return format([[
offline_backend = "postgres"
offline_postgres = %s
acl = { small = { "carol@localhost" } }
access = { max_user_offline_messages = { { acl = "small", value = 3 }, { acl = "all", value = 100 } } }
]], offline_postgres)
end


-- Hosts on node B whose offline_postgres is wrong: { host, config, what the log must say, and
-- how the line ends (default: the module is not loaded) }. A database that refuses the
-- connection is like one that is away: the module comes up and tries again on use.
local BAD = {
	{ "badpassword.localhost", nil, 'password authentication failed for user "offline_pw"', "tried again on use" },
	{ "missing.localhost", 'offline_backend = "postgres"',
		"offline_postgres must be set for the postgres backend" },
	{ "badport.localhost", 'offline_backend = "postgres"\noffline_postgres = { driver = "PostgreSQL", port = "x" }',
		"offline_postgres.port must be a port number" },
}

TestTwoNodes = {}

function TestTwoNodes:nodes()
	local pg = postgres.require_server(lu)
	if TestTwoNodes.a then return TestTwoNodes.a, TestTwoNodes.b, pg end
	local db = pg:fresh_database()
	TestTwoNodes.db = db
	BAD[1][2] = format('offline_backend = "postgres"\noffline_postgres = %q',
		format("host=127.0.0.1 port=%d dbname=%s user=%s password=wrong sslmode=disable",
			pg.port, db, postgres.PASSWORD_ROLE))
	local extra = {}
	for _, case in ipairs(BAD) do extra[#extra + 1] = format("VirtualHost %q\n%s\n", case[1], case[2]) end
	TestTwoNodes.a = offline.start { host = host_config(format("%q",
		format("host=127.0.0.1 port=%d dbname=%s user=postgres sslmode=disable", pg.port, db))) }
	TestTwoNodes.b = offline.start { host = host_config(format(
		'{ driver = "PostgreSQL", database = %q, username = "postgres", host = "127.0.0.1", port = %d }',
		db, pg.port)) .. table.concat(extra) }
	return TestTwoNodes.a, TestTwoNodes.b, pg
end

function TestTwoNodes.teardownClass()
	for _, k in ipairs { "a", "b" } do
		if TestTwoNodes[k] then TestTwoNodes[k]:cleanup(); TestTwoNodes[k] = nil end
	end
end

function TestTwoNodes:test_stored_on_a_delivered_on_b()
	local a, b = self:nodes()
	local alice = online(a, "alice")
	alice:send(chat("bob@localhost", "x1", "through node A"))
	alice:send(chat("bob@localhost", "x2", "also through node A"))
	lu.assertEquals(#alice:ping(), 0, "nothing comes back to the sender")
	local got = collect_offline(b, "bob")
	lu.assertEquals(ids(got), { "x1", "x2" })
	lu.assertEquals(got[1]:get_child_text("body"), "through node A")
	lu.assertEquals(got[1].attr.from, alice.jid)
	local d = delays(got[1])
	lu.assertEquals(#d, 1)
	lu.assertEquals(d[1]:get_text(), "Offline Storage")
	lu.assertEquals(#collect_offline(a, "bob"), 0, "delivered once, across both nodes")
	alice:close()
end

function TestTwoNodes:test_limit_holds_across_nodes()
	local a, b = self:nodes()
	local alice, dave = online(a, "alice"), online(b, "dave")
	for i = 1, 2 do alice:send(chat("carol@localhost", "a" .. i, "from A")) end
	lu.assertEquals(#messages(alice:ping()), 0)
	for i = 1, 2 do dave:send(chat("carol@localhost", "b" .. i, "from B")) end
	local back = messages(dave:ping())
	lu.assertEquals(ids(back), { "b2" }, "the fourth message is over the limit of 3")
	lu.assertEquals(error_of(back[1]), { type = "error", etype = "wait", code = "500", condition = "resource-constraint", text = policy.LIMIT_TEXT })
	-- prosodyctl on either node sees the shared queue
	local ok, out = a:prosodyctl("mod_offline", "count", "carol@localhost")
	lu.assertTrue(ok, out)
	lu.assertStrContains(out, "carol@localhost has 3 offline messages")
	ok, out = b:prosodyctl("mod_offline", "list", "carol@localhost")
	lu.assertTrue(ok, out)
	lu.assertEquals(select(2, out:gsub("alice@localhost", "")), 2, out)
	lu.assertEquals(ids(collect_offline(a, "carol")), { "a1", "a2", "b1" })
	alice:close()
	dave:close()
end

-- Group commit: the messages Prosody reads at once share one transaction (one xmin), and
-- the answer that follows them comes after its commit.
function TestTwoNodes:test_messages_read_at_once_share_a_transaction()
	local a, b, pg = self:nodes()
	local alice = online(a, "alice")
	local burst = {}
	for i = 1, 5 do burst[i] = tostring(chat("boss@localhost", "g" .. i, "burst")) end
	alice:send(table.concat(burst))
	lu.assertEquals(#messages(alice:ping()), 0)
	lu.assertEquals(pg:psql("SELECT count(*) || ' ' || count(DISTINCT xmin::text) FROM offline_message "
		.. "WHERE username = 'boss'::bytea", TestTwoNodes.db), "5 1", "five messages, one transaction")
	lu.assertEquals(ids(collect_offline(b, "boss")), { "g1", "g2", "g3", "g4", "g5" })
	alice:close()
end

-- Both nodes store at the same moment: still exactly 3.
function TestTwoNodes:test_limit_holds_when_both_store_at_once()
	local a, b = self:nodes()
	local alice, dave = online(a, "alice"), online(b, "dave")
	for i = 1, 6 do
		alice:send(chat("carol@localhost", "p" .. i, "A"))
		dave:send(chat("carol@localhost", "q" .. i, "B"))
	end
	local errors = #messages(alice:ping()) + #messages(dave:ping())
	lu.assertEquals(errors, 9, "12 sent, 3 stored")
	lu.assertEquals(#collect_offline(b, "carol"), 3)
	alice:close()
	dave:close()
end

-- PostgreSQL goes away: the sender gets the storage-failure error; once it is back,
-- both nodes reconnect by themselves and storing and delivery work again.
function TestTwoNodes:test_outage_fails_the_store_then_recovers()
	local a, b, pg = self:nodes()
	local alice = online(a, "alice")
	pg:stop("fast")
	local ok, err = pcall(function()
		alice:send(chat("bob@localhost", "lost", "while PostgreSQL is down"))
		local back = messages(alice:ping())
		lu.assertEquals(ids(back), { "lost" })
		lu.assertEquals(error_of(back[1]), { type = "error", etype = "wait", code = "500", condition = "internal-server-error",
			text = policy.FAILURE_TEXT })
		lu.assertStrContains(a:log(), "PostgreSQL is unreachable")
	end)
	pg:start()
	assert(ok, err)
	socket.sleep(0.3) -- past the first reconnection backoff
	alice:send(chat("bob@localhost", "kept", "after the restart"))
	lu.assertEquals(#messages(alice:ping()), 0, "stored again")
	lu.assertEquals(ids(collect_offline(b, "bob", nil, nil, 1)), { "kept" })
	alice:close()
end

function TestTwoNodes:test_bad_offline_postgres_refuses_to_load()
	local _, b = self:nodes()
	local log = b:log()
	for _, case in ipairs(BAD) do
		local line = log:match("[^\n]*" .. case[1]:gsub("%p", "%%%0") .. ":offline[^\n]*error[^\n]*") or ""
		lu.assertStrContains(line, case[3], false, case[1])
		lu.assertStrContains(line, case[4] or ("not loaded on " .. case[1]))
		lu.assertNotStrContains(line, "password=wrong", "no password in the log")
	end
	lu.assertStrContains(log, "cannot open the postgres offline store of badpassword.localhost: cannot connect to PostgreSQL")
end

---------------------------------------------------------------------------------------------------
-- PostgreSQL not running when Prosody starts: every message to an offline user gets the
-- storage-failure error (nothing is silently dropped), a login finds nothing and breaks
-- nothing; once the database is started, a message is stored and delivered at login, without
-- restarting Prosody.
TestAwayAtStart = {}

function TestAwayAtStart:setUp()
	postgres.require_server(lu) -- (the skip switch)
	self.pg = postgres.start()
	self.pg:stop("fast")
	self.srv = offline.start { host = host_config(format("%q",
		format("host=127.0.0.1 port=%d dbname=offline user=postgres sslmode=disable", self.pg.port))) }
end

function TestAwayAtStart:tearDown()
	if self.srv then self.srv:cleanup() end
	if self.pg then self.pg:cleanup() end
end

local FAILURE = { type = "error", etype = "wait", code = "500", condition = "internal-server-error", text = policy.FAILURE_TEXT }

function TestAwayAtStart:test_module_answers_with_the_failure_error_then_recovers()
	local srv, pg = self.srv, self.pg
	local alice = online(srv, "alice")
	for i = 1, 3 do alice:send(chat("bob@localhost", "away" .. i, "while PostgreSQL is down")) end
	local back = messages(alice:ping())
	lu.assertEquals(ids(back), { "away1", "away2", "away3" }, "every message is answered")
	for _, m in ipairs(back) do lu.assertEquals(error_of(m), FAILURE) end
	lu.assertEquals(#collect_offline(srv, "bob"), 0, "a login finds nothing, and nothing breaks")
	pg:start()
	-- retried on use, at most every few seconds: until then the failure error, then stored
	local deadline, stored, n = socket.gettime() + 20, nil, 0
	while not stored and socket.gettime() < deadline do
		n = n + 1
		alice:send(chat("bob@localhost", "back" .. n, "after the start"))
		local got = messages(alice:ping())
		if #got == 0 then
			stored = "back" .. n
		else
			lu.assertEquals(ids(got), { "back" .. n })
			lu.assertEquals(error_of(got[1]), FAILURE)
			socket.sleep(0.5)
		end
	end
	lu.assertNotNil(stored, "the store opened by itself once PostgreSQL was there")
	lu.assertEquals(ids(collect_offline(srv, "bob", nil, nil, 1)), { stored })
	local final = srv:log()
	lu.assertStrContains(final, "cannot open the postgres offline store of localhost")
	lu.assertStrContains(final, "tried again on use")
	lu.assertStrContains(final, "Offline store open after all")
	lu.assertNotStrContains(final, "attempt to index a nil value")
	alice:close()
end

---------------------------------------------------------------------------------------------------
-- PostgreSQL behind a network gone silent (spec/support/pg_proxy.lua drops the connections, then
-- accepts new ones and never answers) while a client pings the server every 100 ms and sends
-- messages to an offline user: the server never waits for the database (no ping answer takes
-- 0.5 s), every message gets its answer (the storage-failure error; none is silently lost), and
-- once the network is back a message is stored and delivered at login, without a restart.
TestSilentNetwork = {}

function TestSilentNetwork:setUp()
	local pg = postgres.require_server(lu)
	self.proxy = pg:proxy()
	self.srv = offline.start { host = host_config(format("%q", format(
		"host=127.0.0.1 port=%d dbname=%s user=postgres sslmode=disable", self.proxy.port, pg:fresh_database()))) }
end

function TestSilentNetwork:tearDown()
	if self.srv then self.srv:cleanup() end
	if self.proxy then self.proxy:stop() end
end

-- Pings every 100 ms for `seconds`, sending a message to bob every third round; returns the
-- slowest ping answer (s), the ids sent and the errors that came back (id -> error_of).
local function ping_and_send(alice, seconds, prefix)
	local worst, sent, bounced, n = 0, {}, {}, 0
	local stop = socket.gettime() + seconds
	while socket.gettime() < stop do
		n = n + 1
		if n % 3 == 1 then
			sent[#sent + 1] = prefix .. n
			alice:send(chat("bob@localhost", prefix .. n, "while the network is silent"))
		end
		local t = socket.gettime()
		local before = alice:ping(5)
		local took = socket.gettime() - t
		if took > worst then worst = took end
		for _, m in ipairs(messages(before)) do bounced[m.attr.id] = error_of(m) end
		socket.sleep(math.max(0, 0.1 - took))
	end
	for _, m in ipairs(messages(alice:ping(5))) do bounced[m.attr.id] = error_of(m) end
	return worst, sent, bounced
end

function TestSilentNetwork:test_the_server_never_waits_for_the_database()
	local srv, proxy = self.srv, self.proxy
	local alice = online(srv, "alice")
	alice:send(chat("bob@localhost", "first", "before"))
	lu.assertEquals(#messages(alice:ping()), 0, "stored")
	proxy:blackhole(true)
	local worst, sent, bounced = ping_and_send(alice, 4, "down")
	lu.assertTrue(proxy:held() >= 1, "a reconnection attempt was held unanswered")
	proxy:blackhole(false)
	lu.assertTrue(worst < 0.5, format("a ping answer took %.3f s", worst))
	for _, id in ipairs(sent) do lu.assertEquals(bounced[id], FAILURE, id .. " got the storage-failure error") end
	-- the attempt held by the blackhole gives up after connect_timeout, then a new one connects
	local deadline, stored, n = socket.gettime() + 30, nil, 0
	while not stored and socket.gettime() < deadline do
		n = n + 1
		alice:send(chat("bob@localhost", "back" .. n, "after the network is back"))
		local t = socket.gettime()
		local got = messages(alice:ping(5))
		lu.assertTrue(socket.gettime() - t < 0.5, "a ping answer waited for the database")
		if #got == 0 then
			stored = "back" .. n
		else
			lu.assertEquals(ids(got), { "back" .. n })
			lu.assertEquals(error_of(got[1]), FAILURE)
			socket.sleep(0.2)
		end
	end
	lu.assertNotNil(stored, "stored again without a restart")
	lu.assertEquals(ids(collect_offline(srv, "bob", nil, nil, 2)), { "first", stored })
	lu.assertStrContains(srv:log(), "PostgreSQL is unreachable")
	alice:close()
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
