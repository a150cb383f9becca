-- offline_store.flexible without a server: node ids, request parsing, the answers, and the
-- service over a memory store with stand-in sessions (headers read a page at a time,
-- set-aside and expired rows left out, forbidden requests, the no-flood rule, copies).

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local flexible = require "offline_store.flexible"
local core = require "offline_store.core"
local st = require "util.stanza"

local NS = flexible.NS

TestFlexibleNodes = {}

function TestFlexibleNodes:test_round_trip_and_order()
	local a = flexible.node_of { id = 9, ts = 1700000000000000 }
	local b = flexible.node_of { id = 10, ts = 1600000000000000 }
	lu.assertEquals({ flexible.parse_node(a) }, { 9, 1700000000000000 })
	lu.assertEquals({ flexible.parse_node(b) }, { 10, 1600000000000000 })
	lu.assertTrue(a < b, "dictionary order is arrival (id) order")
	local big = flexible.node_of { id = math.maxinteger, ts = 0 }
	lu.assertEquals({ flexible.parse_node(big) }, { math.maxinteger, 0 })
end

function TestFlexibleNodes:test_foreign_nodes()
	for _, node in ipairs { "2003-02-27T22:52:37.225Z", "", "9-1", ("0"):rep(16) .. "-1",
			("f"):rep(16) .. "-1", ("1"):rep(16) .. "-", ("1"):rep(16) .. "-" .. ("1"):rep(17),
			("1"):rep(16) .. "-1x", 42 } do
		lu.assertNil(flexible.parse_node(node), tostring(node))
	end
end

local function iq(iq_type, build, to)
	local s = st.iq({ type = iq_type, id = "x", to = to }):tag("offline", { xmlns = NS })
	build(s)
	return s:reset()
end

TestFlexibleParse = {}

function TestFlexibleParse:test_requests()
	lu.assertEquals(flexible.parse(iq("get", function(s) s:tag("fetch"):up() end)), { kind = "fetch" })
	lu.assertEquals(flexible.parse(iq("set", function(s) s:tag("fetch"):up() end)), { kind = "fetch" })
	lu.assertEquals(flexible.parse(iq("set", function(s) s:tag("purge"):up() end)), { kind = "purge" })
	lu.assertEquals(flexible.parse(iq("set", function(s)
		s:tag("item", { action = "view", node = "a" }):up():tag("item", { action = "remove", node = "b" }):up()
	end)), { kind = "items", items = { { action = "view", node = "a" }, { action = "remove", node = "b" } } })
	lu.assertEquals(flexible.parse(iq("get", function(s) s:tag("item", { action = "view", node = "a" }):up() end)),
		{ kind = "items", items = { { action = "view", node = "a" } } })
end

function TestFlexibleParse:test_bad_requests()
	local bad = {
		iq("get", function(s) s:tag("purge"):up() end),
		iq("get", function(s) s:tag("item", { action = "remove", node = "a" }):up() end),
		iq("set", function() end),
		iq("set", function(s) s:tag("fetch"):up():tag("purge"):up() end),
		iq("set", function(s) s:tag("fetch"):up():tag("fetch"):up() end),
		iq("set", function(s) s:tag("fetch"):up():tag("item", { action = "view", node = "a" }):up() end),
		iq("set", function(s) s:tag("item", { action = "read", node = "a" }):up() end),
		iq("set", function(s) s:tag("item", { node = "a" }):up() end),
		iq("set", function(s) s:tag("item", { action = "view" }):up() end),
		iq("set", function(s) s:tag("other"):up() end),
		iq("set", function(s) s:tag("fetch", { xmlns = "urn:other" }):up() end),
		st.iq({ type = "get", id = "x" }):tag("query", { xmlns = "urn:other" }):reset(),
	}
	for i, s in ipairs(bad) do
		local req, condition = flexible.parse(s)
		lu.assertNil(req, i)
		lu.assertEquals(condition, "bad-request", i)
	end
end

function TestFlexibleParse:test_count_reply()
	local reply = flexible.count_reply(st.stanza("query", { xmlns = "http://jabber.org/protocol/disco#info" }), 66)
	local expected = st.stanza("query", { xmlns = "http://jabber.org/protocol/disco#info" })
		:tag("identity", { category = "automation", type = "message-list" }):up()
		:tag("feature", { var = NS }):up()
		:tag("x", { xmlns = "jabber:x:data", type = "result" })
			:tag("field", { var = "FORM_TYPE", type = "hidden" }):tag("value"):text(NS):up():up()
			:tag("field", { var = "number_of_messages" }):tag("value"):text("66")
	-- (compared as trees: attribute order in a serialisation is a hash's)
	lu.assertEquals(st.preserialize(reply), st.preserialize(expected:reset()))
end

--- The service over a memory store.

local HOST = "example.com"
local NOW = 2000000000000000

local function message(i)
	return ("<message xmlns='jabber:client' from='bob@%s/pda' to='alice@%s' id='m%d'><body>%d</body></message>")
		:format(HOST, HOST, i, i)
end

local function session(user, extra)
	local s = { type = "c2s", username = user, host = HOST, full_jid = user .. "@" .. HOST .. "/r", sent = {} }
	s.send = function(stanza) s.sent[#s.sent + 1] = stanza end
	for k, v in pairs(extra or {}) do s[k] = v end
	return s
end

local function service(db, sessions, page)
	local lists = 0
	local real_list = db.list
	local counted = setmetatable({}, { __index = function(_, name)
		if name == "list" then return function(_, ...) lists = lists + 1; return real_list(db, ...) end end
		local f = db[name]
		return function(_, ...) return f(db, ...) end
	end })
	local f = flexible.new {
		host = HOST, page = page, db = function() return counted end, now_us = function() return NOW end,
		later = function(_, fn) fn() end, log = function() end, set_aside_meta = core.SET_ASIDE,
		sessions = function() return sessions end,
		deliver = function(item) return require "util.xml".parse(item.xml) end,
	}
	return f, function() return lists end
end

local function disco_event(origin, to)
	local stanza = st.iq({ type = "get", id = "d", to = to }):tag("query", { node = NS }):reset()
	return { origin = origin, stanza = stanza, node = NS, exists = false,
		reply = st.reply(stanza):tag("query", { node = NS }) }
end

TestFlexibleService = {}

function TestFlexibleService:setUp()
	self.db = core.open_memory()
	for i = 1, 5 do assert(self.db:store(HOST, "alice", "bob@" .. HOST .. "/pda", message(i), NOW - 100 + i)) end
	-- an expired row and a set-aside one: counted, not listed
	assert(self.db:store(HOST, "alice", "bob@" .. HOST .. "/pda", message(6), NOW - 50, NOW - 1))
	assert(self.db:store(HOST, "alice", "bob@" .. HOST .. "/pda", "<damaged", NOW - 40, nil, nil, nil, core.SET_ASIDE))
end

function TestFlexibleService:tearDown() self.db:close() end

function TestFlexibleService:test_headers_paged()
	local f, lists = service(self.db, {}, 2)
	local alice = session("alice")
	local event = disco_event(alice)
	lu.assertNil(f:items_node(event))
	lu.assertTrue(event.exists)
	lu.assertTrue(alice.offline_flexible)
	local items = event.reply.tags[1].tags
	lu.assertEquals(#items, 5)
	for i, it in ipairs(items) do
		lu.assertEquals(it.attr.jid, "alice@" .. HOST)
		lu.assertEquals(it.attr.name, "bob@" .. HOST .. "/pda")
		lu.assertEquals(select(2, flexible.parse_node(it.attr.node)), NOW - 100 + i)
	end
	lu.assertEquals(lists(), 4, "7 rows in pages of 2")
	local info = disco_event(session("alice"))
	lu.assertNil(f:info_node(info))
	lu.assertStrContains(tostring(info.reply), "<value>7</value>")
end

function TestFlexibleService:test_view_remove_purge()
	local f = service(self.db, {}, 2)
	local alice = session("alice")
	local event = disco_event(alice)
	f:items_node(event)
	local nodes = {}
	for i, it in ipairs(event.reply.tags[1].tags) do nodes[i] = it.attr.node end
	local function query(iq_type, build, origin, to)
		origin = origin or alice
		local s = iq(iq_type, build, to)
		origin.sent = {}
		lu.assertTrue(f:query { origin = origin, stanza = s })
		return origin.sent
	end
	local sent = query("get", function(s) s:tag("item", { action = "view", node = nodes[4] }):up() end)
	lu.assertEquals(#sent, 2)
	lu.assertEquals(sent[1].attr.id, "m4")
	lu.assertEquals(sent[1]:get_child("offline", NS):get_child("item").attr.node, nodes[4])
	lu.assertEquals(sent[2].attr.type, "result")
	lu.assertTrue(f:is_copy(alice, sent[1]))
	lu.assertFalse(f:is_copy(alice, sent[1]), "once per copy sent")
	sent = query("set", function(s) s:tag("item", { action = "remove", node = nodes[1] }):up() end)
	lu.assertEquals(sent[1].attr.type, "result")
	lu.assertEquals(self.db:count(HOST, "alice"), 6)
	-- another user's session
	sent = query("set", function(s) s:tag("purge"):up() end, session("carol"), "alice@" .. HOST)
	lu.assertEquals(sent[1].attr.type, "error")
	lu.assertEquals(sent[1].tags[1].tags[1].name, "forbidden")
	-- fetch: every deliverable row, then the result, in pages
	sent = query("get", function(s) s:tag("fetch"):up() end)
	lu.assertEquals(#sent, 5)
	lu.assertEquals(sent[5].attr.type, "result")
	sent = query("set", function(s) s:tag("purge"):up() end)
	lu.assertEquals(sent[1].attr.type, "result")
	lu.assertEquals(self.db:count(HOST, "alice"), 0)
end

function TestFlexibleService:test_owner()
	local f = service(self.db, {}, 2)
	local alice = session("alice")
	local function owner(origin, to)
		return f:owner(origin, st.iq({ type = "get", id = "o", to = to }))
	end
	lu.assertEquals(owner(alice), "alice")
	lu.assertEquals(owner(alice, "alice@" .. HOST), "alice")
	lu.assertNil(owner(alice, "bob@" .. HOST))
	lu.assertNil(owner(alice, "alice@" .. HOST .. "/r"))
	lu.assertNil(owner(alice, "alice@other.example"))
	lu.assertNil(owner(session("alice", { host = "other.example" })))
	lu.assertNil(owner(session("alice", { type = "s2sin" })))
	local event = disco_event(session("carol"), "alice@" .. HOST)
	lu.assertTrue(f:info_node(event))
end

function TestFlexibleService:test_holds_flood()
	local first, second = session("alice"), session("alice")
	local f = service(self.db, { r1 = first, r2 = second }, 2)
	lu.assertFalse(f:holds_flood(second))
	first.offline_flexible = true
	lu.assertTrue(f:holds_flood(first))
	lu.assertTrue(f:holds_flood(second), "a second resource while the first is there")
	first.destroyed = true
	lu.assertFalse(f:holds_flood(second))
	f.enabled = false
	lu.assertFalse(f:holds_flood(first))
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
