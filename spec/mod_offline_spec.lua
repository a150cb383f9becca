-- mod_offline against a real Prosody 0.12 on loopback: every scenario of
-- the plugin's acceptance list, through the real server and a real XMPP client.
-- Servers are started lazily per class and stopped in teardownClass.

local lu = require "luaunit"
local offline = require "support.offline"
local st = require "util.stanza"
local datetime = require "util.datetime"
local socket = require "socket"
local support = require "support.util"

local NS_DELAY = offline.NS_DELAY
local start, login, online, chat = offline.start, offline.login, offline.online, offline.chat
local messages, ids, delays, collect_offline = offline.messages, offline.ids, offline.delays, offline.collect_offline

local error_of = offline.error_of

local with_server = offline.with_server

---------------------------------------------------------------------------------------------------
TestOffline = with_server(function() return {} end)

-- 1. stored while offline; delivered once at login with one delay; nothing before presence
function TestOffline:test_store_and_deliver_with_one_delay()
	local srv = self:server()
	local a = online(srv, "alice")
	local before = os.time()
	a:send(chat("bob@localhost", "s1", "hello offline bob"))
	lu.assertEquals(#a:ping(), 0, "nothing comes back to the sender")
	local after = os.time()
	local got = collect_offline(srv, "bob")
	lu.assertEquals(#got, 1)
	local m = got[1]
	lu.assertEquals(m.attr.id, "s1")
	lu.assertEquals(m.attr.from, a.jid)
	lu.assertEquals(m:get_child_text("body"), "hello offline bob")
	local d = delays(m)
	lu.assertEquals(#d, 1)
	lu.assertEquals(d[1].attr.from, "localhost")
	lu.assertEquals(d[1]:get_text(), "Offline Storage")
	local stamp = datetime.parse(d[1].attr.stamp)
	lu.assertTrue(stamp >= before and stamp <= after, "stamp is the time stored")
	lu.assertEquals(#collect_offline(srv, "bob"), 0, "delivered once")
	a:close()
end

-- A message nested deeper than the C serializer goes (256 levels) is stored the Lua
-- way (db:store says "too deep") and delivered whole.
function TestOffline:test_deeply_nested_message_is_stored_whole()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(chat("bob@localhost", "deep", "deep one", function(m)
		m:tag("x", { xmlns = "urn:example:deep" })
		for _ = 1, 299 do m:tag("x") end
		m:text("bottom"):reset()
	end))
	lu.assertEquals(#a:ping(), 0, "no error back")
	local got = collect_offline(srv, "bob")
	lu.assertEquals(#got, 1)
	local depth, el = 0, got[1]:get_child("x", "urn:example:deep")
	while el do depth, el = depth + 1, el.tags[1] end
	lu.assertEquals(depth, 300)
	lu.assertEquals(got[1]:get_child_text("body"), "deep one")
	lu.assertEquals(#delays(got[1]), 1)
	a:close()
end

-- XEP-0203 §5: a stamp the sender supplied is never trusted; its delay is replaced
function TestOffline:test_client_delay_replaced()
	local srv = self:server()
	local a = online(srv, "alice")
	local before = os.time()
	a:send(chat("bob@localhost", "forged", "from the past", function(m)
		m:tag("delay", { xmlns = NS_DELAY, from = "localhost", stamp = "2001-01-01T00:00:00Z" }):up()
		m:tag("delay", { xmlns = NS_DELAY, from = "alice@localhost", stamp = "2002-01-01T00:00:00Z" }):up()
	end))
	a:ping()
	local got = collect_offline(srv, "bob")
	lu.assertEquals(ids(got), { "forged" })
	local d = delays(got[1])
	lu.assertEquals(#d, 1)
	lu.assertTrue(datetime.parse(d[1].attr.stamp) >= before, "the stamp is the time stored")
	a:close()
end

-- 2. 50 messages: order kept, none lost or duplicated
function TestOffline:test_fifty_in_order()
	local srv = self:server()
	local a = online(srv, "alice")
	local sent = {}
	for i = 1, 50 do
		sent[i] = "n" .. i
		a:send(chat("bob@localhost", sent[i], "message " .. i))
	end
	a:ping()
	lu.assertEquals(ids(collect_offline(srv, "bob", 1.5)), sent)
	a:close()
end

-- 3. what is not stored, and that nothing comes back for it
function TestOffline:test_not_stored_and_no_reply()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(st.message({ to = "bob@localhost", type = "error", id = "e1" }):tag("body"):text("x"):up())
	a:send(st.message({ to = "bob@localhost", type = "headline", id = "h1" }):tag("body"):text("x"):up())
	a:send(chat("bob@localhost", "cs1", nil, function(m)
		m:tag("composing", { xmlns = "http://jabber.org/protocol/chatstates" }):up()
	end))
	a:send(chat("bob@localhost", "ns1", "do not keep", function(m)
		m:tag("no-store", { xmlns = "urn:xmpp:hints" }):up()
	end))
	a:send(chat("bob@localhost", "np1", "do not keep either", function(m)
		m:tag("no-permanent-store", { xmlns = "urn:xmpp:hints" }):up()
	end))
	a:send(chat("bob@localhost", "keep1", nil, function(m)
		m:tag("paused", { xmlns = "http://jabber.org/protocol/chatstates" }):up()
		m:tag("store", { xmlns = "urn:xmpp:hints" }):up()
	end))
	a:send(st.message({ to = "bob@localhost", id = "untyped" }))
	lu.assertEquals(#a:ping(), 0, "no error for any of them")
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "keep1", "untyped" })
	a:close()
end

-- 6. expiry
function TestOffline:test_expired_not_delivered()
	local srv = self:server()
	local a = online(srv, "alice")
	local function expiring(id, seconds)
		return chat("bob@localhost", id, "x", function(m)
			m:tag("x", { xmlns = "jabber:x:expire", seconds = seconds }):up()
		end)
	end
	a:send(expiring("short", "1"))
	a:send(expiring("long", "3600"))
	a:ping()
	socket.sleep(2.1)
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "long" })
	a:close()
end

-- 7. negative priority only: stored; delivered to a non-negative resource; absent full JID stored
function TestOffline:test_negative_priority_and_absent_resource()
	local srv = self:server()
	local neg = login(srv, "bob", "neg")
	neg:presence(-1)
	neg:ping()
	local a = online(srv, "alice")
	a:send(chat("bob@localhost", "to-bare", "stored"))
	a:send(chat("bob@localhost/gone", "to-gone", "also stored"))
	a:send(chat("bob@localhost/neg", "to-neg", "direct"))
	a:ping()
	lu.assertEquals(ids(neg:collect(0.5)), { "to-neg" }, "only the full-JID message reaches the negative resource")
	local got = collect_offline(srv, "bob", 0.8, 0)
	lu.assertEquals(ids(got), { "to-bare", "to-gone" })
	lu.assertEquals(got[2].attr.to, "bob@localhost/gone", "the full JID is kept")
	neg:close(); a:close()
end

-- 13. deleting the account through the live shell removes its queue
function TestOffline:test_user_delete_removes_queue()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(chat("carol@localhost", "c1", "for carol"))
	a:send(chat("carol@localhost", "c2", "for carol"))
	a:ping()
	local function carol_rows()
		return tonumber(offline.sql(srv, "SELECT count(*) FROM message JOIN queue ON queue.id = qid WHERE user = 'carol'"))
	end
	lu.assertEquals(carol_rows(), 2)
	local ok, out = srv:prosodyctl("shell", "user", "delete", "carol@localhost")
	lu.assertTrue(ok, out)
	lu.assertEquals(carol_rows(), 0)
	a:close()
end

function TestOffline:test_disco_advertises_msgoffline()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(st.iq({ type = "get", to = "localhost", id = "disco1" }):query("http://jabber.org/protocol/disco#info"))
	local reply = assert(a:wait_for(function(s) return s.name == "iq" and s.attr.id == "disco1" end))
	local found = false
	for feature in reply:get_child("query", "http://jabber.org/protocol/disco#info"):childtags("feature") do
		if feature.attr.var == "msgoffline" then found = true end
	end
	lu.assertTrue(found)
	a:close()
end

---------------------------------------------------------------------------------------------------
-- 4. groupchat, toggle off (default) and on
TestGroupchatOff = with_server(function() return {} end)

function TestGroupchatOff:test_bounced_with_text()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(st.message({ to = "bob@localhost", type = "groupchat", id = "g1" }):tag("body"):text("x"):up())
	local back = messages(a:ping())
	lu.assertEquals(#back, 1)
	lu.assertEquals(back[1].attr.id, "g1")
	lu.assertEquals(back[1].attr.from, "bob@localhost")
	lu.assertEquals(error_of(back[1]), { type = "error", etype = "cancel", code = "503",
		condition = "service-unavailable", text = "Bounce offline message" })
	lu.assertEquals(#collect_offline(srv, "bob"), 0)
	a:close()
end

TestGroupchatOn = with_server(function() return { host = "offline_store_groupchat_messages = true" } end)

function TestGroupchatOn:test_stored_and_delivered()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(st.message({ to = "bob@localhost", type = "groupchat", id = "g2" }):tag("body"):text("x"):up())
	lu.assertEquals(#a:ping(), 0)
	local got = collect_offline(srv, "bob")
	lu.assertEquals(ids(got), { "g2" })
	lu.assertEquals(got[1].attr.type, "groupchat")
	lu.assertEquals(#delays(got[1]), 1)
	a:close()
end

---------------------------------------------------------------------------------------------------
-- 5. limits through access rules
TestLimits = with_server(function()
	return {
		global = 'admins = { "root@localhost" }',
		host = [[
acl = { vip = { "boss@localhost" } }
access = {
	three = { { acl = "vip", value = "infinity" }, { acl = "admin", value = 5 }, { acl = "all", value = 3 } },
}
offline_access_max_user_messages = "three"
]],
	}
end)

local function fill(a, to, n, prefix)
	for i = 1, n do a:send(chat(to, prefix .. i, "m" .. i)) end
	return messages(a:ping())
end

function TestLimits:test_all_three_then_exact_error()
	local srv = self:server()
	local a = online(srv, "alice")
	local back = fill(a, "bob@localhost", 4, "l")
	lu.assertEquals(#back, 1)
	local e = back[1]
	lu.assertEquals(e.attr.id, "l4")
	lu.assertEquals(e.attr.from, "bob@localhost")
	lu.assertEquals(e.attr.to, a.jid)
	lu.assertEquals(e:get_child_text("body"), "m4", "original children kept")
	lu.assertEquals(error_of(e), { type = "error", etype = "wait", code = "500", condition = "resource-constraint",
		text = "Your contact offline message queue is full. The message has been discarded." })
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "l1", "l2", "l3" })
	a:close()
end

function TestLimits:test_admin_and_custom_acl()
	local srv = self:server()
	local a = online(srv, "alice")
	lu.assertEquals(ids(fill(a, "root@localhost", 6, "r")), { "r6" }, "admins get 5")
	lu.assertEquals(#fill(a, "boss@localhost", 20, "v"), 0, "vip is unlimited")
	lu.assertEquals(#collect_offline(srv, "root"), 5)
	lu.assertEquals(#collect_offline(srv, "boss", 1.2), 20)
	a:close()
end

TestDefaultLimit = with_server(function() return {} end)

function TestDefaultLimit:test_builtin_default_is_100()
	local srv = self:server()
	local a = online(srv, "alice")
	lu.assertEquals(ids(fill(a, "bob@localhost", 101, "d")), { "d101" })
	lu.assertEquals(#collect_offline(srv, "bob", 2), 100)
	a:close()
end

---------------------------------------------------------------------------------------------------
-- 8. restart between store and login (sqlite); reloading the module keeps the data
-- Two hosts on the default sqlite file: one write with a message to each host's
-- offline user and a ping. Each host has its own batch on its own connection; the
-- second must commit the first before it writes, or it waits out the busy timeout
-- (2 s, the whole server frozen) and fails.
TestTwoHosts = with_server(function() return { host = 'VirtualHost "b.localhost"' } end)

function TestTwoHosts:test_one_file_two_batches()
	local srv = self:server()
	local ok, out = srv:prosodyctl("register", "yuki", "b.localhost", offline.PW)
	lu.assertTrue(ok, out)
	local a = online(srv, "alice")
	local burst = {}
	for i = 1, 3 do
		burst[#burst + 1] = tostring(chat("bob@localhost", "a" .. i, "to host a"))
		burst[#burst + 1] = tostring(chat("yuki@b.localhost", "b" .. i, "to host b"))
	end
	a:send(table.concat(burst))
	local started = socket.gettime()
	local back = messages(a:ping(10))
	local waited = socket.gettime() - started
	lu.assertEquals(#back, 0, "no errors: " .. (back[1] and tostring(back[1]) or ""))
	lu.assertTrue(waited < 1, ("the ping waited %.2f s"):format(waited))
	lu.assertEquals(ids(collect_offline(srv, "bob", 5, nil, 3)), { "a1", "a2", "a3" })
	local y = assert(require("support.xmpp").connect { port = srv.c2s_port, host = "b.localhost",
		user = "yuki", password = offline.PW, resource = "r" })
	y:presence()
	local got = {}
	while #got < 3 do
		local s = y:receive(5)
		if not s then break end
		if s.name == "message" then got[#got + 1] = s.attr.id end
	end
	lu.assertEquals(got, { "b1", "b2", "b3" })
	y:close()
	a:close()
end

TestRestart = with_server(function() return {} end)

function TestRestart:test_restart_and_reload_keep_messages()
	local srv = self:server()
	local a = online(srv, "alice")
	fill(a, "bob@localhost", 5, "p")
	a:close()
	srv:restart()
	a = online(srv, "alice")
	fill(a, "bob@localhost", 2, "q")
	local ok, out = srv:prosodyctl("shell", "module", "reload", "offline", "localhost")
	lu.assertTrue(ok, out)
	fill(a, "bob@localhost", 1, "r")
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "p1", "p2", "p3", "p4", "p5", "q1", "q2", "r1" })
	a:close()
end

TestMemoryReload = with_server(function() return { host = 'offline_backend = "memory"' } end)

function TestMemoryReload:test_reload_keeps_memory_store()
	local srv = self:server()
	local a = online(srv, "alice")
	fill(a, "bob@localhost", 2, "m")
	local ok, out = srv:prosodyctl("shell", "module", "reload", "offline", "localhost")
	lu.assertTrue(ok, out)
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "m1", "m2" })
	a:close()
end

---------------------------------------------------------------------------------------------------
-- 9. mod_smacks: an unacked message on a dropped session comes back once, with one delay
TestSmacks = with_server(function()
	return { modules_enabled = { "smacks" }, global = "smacks_hibernation_time = 1" }
end)

function TestSmacks:test_unacked_message_requeued_once()
	local srv = self:server()
	local b = login(srv, "bob", "phone")
	assert(b:enable_sm { resume = true })
	b:presence()
	b:ping()
	local a = online(srv, "alice")
	local sent_at = os.time()
	a:send(chat("bob@localhost", "sm1", "will be lost"))
	a:ping()
	lu.assertEquals(ids(b:collect(0.5)), { "sm1" })
	b:drop() -- never acked
	-- the session hibernates for smacks_hibernation_time, then its queue is re-routed
	local deadline = socket.gettime() + 10
	repeat
		socket.sleep(0.3)
	until srv:log():find("unacked", 1, true) or socket.gettime() > deadline
	socket.sleep(0.5)
	lu.assertEquals(#messages(a:ping()), 0, "the sender gets no error: the message was kept")
	socket.sleep(2)
	local got = collect_offline(srv, "bob")
	lu.assertEquals(ids(got), { "sm1" })
	local d = delays(got[1])
	lu.assertEquals(#d, 1, "exactly one delay")
	lu.assertEquals(d[1].attr.from, "localhost")
	local stamp = datetime.parse(d[1].attr.stamp)
	lu.assertTrue(stamp >= sent_at and stamp <= sent_at + 1, "the stamp is the original time, not the re-queue time")
	a:close()
end

---------------------------------------------------------------------------------------------------
-- 10. mod_mam: a MAM query before presence vetoes the flood; a later plain login gets it
TestMam = with_server(function() return { modules_enabled = { "mam" } } end)

function TestMam:test_mam_veto_then_plain_login()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(chat("bob@localhost", "mam1", "archived and stored"))
	lu.assertEquals(#a:ping(), 0)
	local m = login(srv, "bob", "mamclient")
	m:send(st.iq({ type = "set", id = "q1" }):tag("query", { xmlns = "urn:xmpp:mam:2", queryid = "x1" }):up())
	assert(m:wait_for(function(s) return s.name == "iq" and s.attr.id == "q1" end))
	m:presence()
	local flood = {}
	for _, s in ipairs(messages(m:collect(0.8))) do
		if not s:get_child("result", "urn:xmpp:mam:2") then flood[#flood + 1] = s end
	end
	lu.assertEquals(#flood, 0, "no offline flood for a MAM client")
	m:close()
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "mam1" })
	a:close()
end

---------------------------------------------------------------------------------------------------
-- 11. mod_offline_stub instead of the store: no error, nothing stored
TestStub = with_server(function()
	return { modules_enabled = { "offline_stub" }, modules_disabled = { "offline" } }
end)

function TestStub:test_silently_dropped()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(chat("bob@localhost", "st1", "into the void"))
	lu.assertEquals(#a:ping(), 0, "no error to the sender")
	lu.assertEquals(#collect_offline(srv, "bob"), 0, "nothing stored")
	lu.assertStrContains(srv:log(), "mod_offline_stub")
	a:close()
end

---------------------------------------------------------------------------------------------------
-- 12. bad configuration: the module refuses to load, and the log names the option
local BAD = {
	{ "badbackend.localhost", 'offline_backend = "cassandra"', "offline_backend: backend must be one of" },
	{ "badacl.localhost", 'access = { max_user_offline_messages = { { acl = "nosuch", value = 1 } } }',
		'access.max_user_offline_messages[1].acl names an undefined ACL "nosuch"' },
	{ "negative.localhost", 'access = { max_user_offline_messages = { { acl = "all", value = -1 } } }',
		"access.max_user_offline_messages[1].value must be a whole number >= 0" },
	{ "fraction.localhost", 'access = { max_user_offline_messages = { { acl = "all", value = 2.5 } } }',
		"access.max_user_offline_messages[1].value must be a whole number >= 0" },
	{ "unwritable.localhost", 'offline_sqlite_file = "/nonexistent/dir/offline.sqlite"',
		"offline_sqlite_file = /nonexistent/dir/offline.sqlite" },
	{ "badsync.localhost", 'offline_sqlite_synchronous = "sometimes"', "offline_sqlite_synchronous must be" },
	{ "groupchat.localhost", 'offline_store_groupchat_messages = "yes"', "offline_store_groupchat_messages must be true or false" },
	{ "sweep.localhost", 'offline_expiry_sweep = "monthly"', 'offline_expiry_sweep must be "hourly", "daily", "weekly" or false' },
}

TestBadConfig = with_server(function()
	local extra = {}
	for _, case in ipairs(BAD) do
		extra[#extra + 1] = ('VirtualHost %q\n%s\n'):format(case[1], case[2])
	end
	-- localhost's section comes last in the generated file, so more hosts can follow it
	return { host = table.concat(extra) }
end)

function TestBadConfig:test_module_refuses_to_load_naming_the_option()
	local srv = self:server()
	local log = srv:log()
	for _, case in ipairs(BAD) do
		local line = log:match("[^\n]*" .. case[1]:gsub("%p", "%%%0") .. ":offline[^\n]*error[^\n]*") or ""
		lu.assertStrContains(log, case[3], false, case[1])
		lu.assertStrContains(line, "not loaded on " .. case[1])
	end
	-- the good host still works
	local a = online(srv, "alice")
	a:send(chat("bob@localhost", "ok1", "fine"))
	a:ping()
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "ok1" })
	a:close()
end

---------------------------------------------------------------------------------------------------
-- The store cannot be opened at start (offline_sqlite_file holds something that is not our
-- database): the module is not loaded, with an error naming the option, and leaves no hook
-- behind, so every message to an offline user gets Prosody's own bounce (cancel,
-- service-unavailable) instead of silence.
TestStoreCannotOpen = {}

function TestStoreCannotOpen:setUp()
	self.dir = support.tmpdir()
	self.file = self.dir .. "/notes.txt"
	support.write(self.file, "shopping list: not an offline-store database\n")
	self.srv = start { host = ("offline_sqlite_file = %q"):format(self.file) }
end

function TestStoreCannotOpen:tearDown()
	if self.srv then self.srv:cleanup() end
	support.rmrf(self.dir)
end

function TestStoreCannotOpen:test_every_message_is_bounced_and_the_error_names_the_file()
	local srv = self.srv
	local a = online(srv, "alice")
	for i = 1, 3 do a:send(chat("bob@localhost", "n" .. i, "while the store cannot open")) end
	local back = messages(a:ping())
	lu.assertEquals(ids(back), { "n1", "n2", "n3" }, "every message is answered")
	for _, m in ipairs(back) do
		lu.assertEquals(error_of(m), { type = "error", etype = "cancel", condition = "service-unavailable" })
	end
	lu.assertEquals(#collect_offline(srv, "bob"), 0)
	local log = srv:log()
	lu.assertStrContains(log, "offline_sqlite_file = " .. self.file)
	lu.assertStrContains(log, "file is not a database; mod_offline is not loaded on localhost")
	lu.assertNotStrContains(log, "attempt to index a nil value")
	lu.assertEquals(support.read(self.file), "shopping list: not an offline-store database\n", "the file is untouched")
	a:close()
end
