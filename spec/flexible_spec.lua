-- XEP-0013 Flexible Offline Message Retrieval through the real Prosody: every use case of
-- the XEP's section 2 as the XEP's own examples send it (support, count, headers, view,
-- remove, fetch, purge), its errors, the rule that a session that asked is not flooded at
-- its initial presence while others are, the option off, a removal of a row leased to
-- another session, node ids across a restart, and slixmpp's xep_0013 plugin as a client.

local lu = require "luaunit"
local offline = require "support.offline"
local support = require "support.util"
local st = require "util.stanza"

local login, online, chat, ids, delays = offline.login, offline.online, offline.chat, offline.ids, offline.delays

local NS = "http://jabber.org/protocol/offline"
local NS_INFO = "http://jabber.org/protocol/disco#info"
local NS_ITEMS = "http://jabber.org/protocol/disco#items"
local NS_DATA = "jabber:x:data"

local function start(host_config, opts)
	opts = opts or {}
	opts.host = host_config
	return offline.start(opts)
end

-- bob (online) sends alice (offline) messages m1..mn, stored once bob's ping comes back.
local function send_to_alice(srv, n, first)
	local b = online(srv, "bob", "pda")
	for i = first or 1, (first or 1) + n - 1 do b:send(chat("alice@localhost", "m" .. i, "body " .. i)) end
	b:ping()
	b:close()
end

local counter = 0
local function new_iq(iq_type, to)
	counter = counter + 1
	return st.iq({ type = iq_type, to = to, id = "flex" .. counter })
end

-- Sends an iq and returns its reply and the messages that arrived before it (in order).
local function request(c, iq)
	local id = iq.attr.id
	c:send(iq)
	local i, err = c:_find(function(el)
		return el.name == "iq" and el.attr.id == id and (el.attr.type == "result" or el.attr.type == "error")
	end, 10)
	assert(i, "no reply to " .. tostring(iq) .. ": " .. tostring(err))
	local before, rest = {}, {}
	for j = 1, i - 1 do before[#before + 1] = c.queue[j] end
	for j = i + 1, #c.queue do rest[#rest + 1] = c.queue[j] end
	local reply = c.queue[i]
	c.queue = rest
	return reply, offline.messages(before)
end

local function disco(c, ns, node, to)
	return request(c, new_iq("get", to):tag("query", { xmlns = ns, node = node }))
end

local function offline_iq(c, iq_type, build, to)
	local iq = new_iq(iq_type, to):tag("offline", { xmlns = NS })
	build(iq)
	return request(c, iq)
end

local function item(action, node)
	return function(iq) iq:tag("item", { action = action, node = node }):up() end
end

-- The number_of_messages of a count reply.
local function count_of(reply)
	lu.assertEquals(reply.attr.type, "result", tostring(reply))
	local x = reply.tags[1]:get_child("x", NS_DATA)
	for _, field in ipairs(x and x.tags or {}) do
		if field.attr.var == "number_of_messages" then return tonumber(field:get_child_text("value")) end
	end
end

-- The headers of a disco#items reply: { { node =, name =, jid = }, ... }.
local function headers(c)
	local reply = disco(c, NS_ITEMS, NS)
	lu.assertEquals(reply.attr.type, "result", tostring(reply))
	local out = {}
	for _, el in ipairs(reply.tags[1].tags) do out[#out + 1] = el.attr end
	return out
end

local function condition(reply)
	lu.assertEquals(reply.attr.type, "error", tostring(reply))
	return offline.error_of(reply).condition
end

local function node_of(m)
	local o = m:get_child("offline", NS)
	local i = o and o:get_child("item")
	return i and i.attr.node
end

local function features(reply)
	local out = {}
	for _, el in ipairs(reply.tags[1].tags) do
		if el.name == "feature" then out[el.attr.var] = true end
	end
	return out
end

TestFlexible = {}

function TestFlexible:tearDown()
	if self.srv then self.srv:cleanup() end
end

-- Discovering server support: the server and the account advertise the feature.
function TestFlexible:test_discovering_support()
	self.srv = start()
	local a = login(self.srv, "alice")
	lu.assertTrue(features(disco(a, NS_INFO, nil, "localhost"))[NS])
	lu.assertTrue(features(disco(a, NS_INFO))[NS])
	a:close()
end

-- Requesting the number of messages (disco#info without 'to' on the node).
function TestFlexible:test_number_of_messages()
	self.srv = start()
	send_to_alice(self.srv, 3)
	local a = login(self.srv, "alice")
	local reply = disco(a, NS_INFO, NS)
	lu.assertEquals(reply.tags[1].attr.node, NS)
	local identity = reply.tags[1]:get_child("identity")
	lu.assertEquals({ identity.attr.category, identity.attr.type }, { "automation", "message-list" })
	lu.assertTrue(features(reply)[NS])
	local form_type = reply.tags[1]:get_child("x", NS_DATA).tags[1]
	lu.assertEquals({ form_type.attr.var, form_type.attr.type, form_type:get_child_text("value") },
		{ "FORM_TYPE", "hidden", NS })
	lu.assertEquals(count_of(reply), 3)
	a:close()
end

-- Requesting message headers: one item per message, in arrival order by dictionary order of
-- the nodes, jid the user, name the sender's full JID; none: an empty query.
function TestFlexible:test_message_headers()
	self.srv = start()
	local a = login(self.srv, "alice")
	lu.assertEquals(headers(a), {})
	a:close()
	send_to_alice(self.srv, 3)
	a = login(self.srv, "alice")
	local h = headers(a)
	lu.assertEquals(#h, 3)
	local nodes = {}
	for i, attr in ipairs(h) do
		lu.assertEquals(attr.jid, "alice@localhost")
		lu.assertEquals(attr.name, "bob@localhost/pda")
		nodes[i] = attr.node
	end
	local sorted = { table.unpack(nodes) }
	table.sort(sorted)
	lu.assertEquals(sorted, nodes)
	lu.assertNotEquals(nodes[1], nodes[2])
	a:close()
end

-- Retrieving specific messages: sent with the node and the delay, before the result, and
-- not removed; a view in an iq set (as some clients send) works too.
function TestFlexible:test_view()
	self.srv = start()
	send_to_alice(self.srv, 3)
	local a = login(self.srv, "alice")
	local h = headers(a)
	local reply, msgs = offline_iq(a, "get", item("view", h[2].node))
	lu.assertEquals(reply.attr.type, "result")
	lu.assertEquals(ids(msgs), { "m2" })
	lu.assertEquals(msgs[1]:get_child_text("body"), "body 2")
	lu.assertEquals(node_of(msgs[1]), h[2].node)
	local delay = delays(msgs[1])
	lu.assertEquals(#delay, 1)
	lu.assertEquals(delay[1].attr.from, "localhost")
	-- two in one iq, in the order asked
	reply, msgs = offline_iq(a, "set", function(iq) item("view", h[3].node)(iq); item("view", h[1].node)(iq) end)
	lu.assertEquals(reply.attr.type, "result")
	lu.assertEquals(ids(msgs), { "m3", "m1" })
	lu.assertEquals(count_of(disco(a, NS_INFO, NS)), 3)
	a:close()
end

-- Removing specific messages (two in one iq set).
function TestFlexible:test_remove()
	self.srv = start()
	send_to_alice(self.srv, 3)
	local a = login(self.srv, "alice")
	local h = headers(a)
	local reply = offline_iq(a, "set", function(iq) item("remove", h[1].node)(iq); item("remove", h[2].node)(iq) end)
	lu.assertEquals(reply.attr.type, "result")
	local left = headers(a)
	lu.assertEquals(#left, 1)
	lu.assertEquals(left[1].node, h[3].node)
	lu.assertEquals(count_of(disco(a, NS_INFO, NS)), 1)
	-- removed: viewing it again is an unknown node
	lu.assertEquals(condition(offline_iq(a, "get", item("view", h[1].node))), "item-not-found")
	a:close()
end

-- Retrieving all messages: every one marked, before the result, none removed; and (without
-- headers asked first) no flood at the initial presence that follows.
function TestFlexible:test_fetch()
	self.srv = start()
	send_to_alice(self.srv, 3)
	local a = login(self.srv, "alice")
	local reply, msgs = offline_iq(a, "get", function(iq) iq:tag("fetch"):up() end)
	lu.assertEquals(reply.attr.type, "result")
	lu.assertEquals(ids(msgs), { "m1", "m2", "m3" })
	for _, m in ipairs(msgs) do
		lu.assertNotNil(node_of(m))
		lu.assertEquals(#delays(m), 1)
	end
	a:presence()
	lu.assertEquals(ids(a:collect(1)), {})
	lu.assertEquals(count_of(disco(a, NS_INFO, NS)), 3)
	a:close()
end

-- Removing all messages.
function TestFlexible:test_purge()
	self.srv = start()
	send_to_alice(self.srv, 3)
	local a = login(self.srv, "alice")
	local reply = offline_iq(a, "set", function(iq) iq:tag("purge"):up() end)
	lu.assertEquals(reply.attr.type, "result")
	lu.assertEquals(headers(a), {})
	lu.assertEquals(count_of(disco(a, NS_INFO, NS)), 0)
	a:close()
	lu.assertEquals(ids(offline.collect_offline(self.srv, "alice", 1)), {})
end

-- The protocol flow: a client that asked for the headers (or only the count) before its
-- initial presence is not flooded, yet gets in-session messages; a second resource that comes
-- while it is there is not flooded either; once it has gone, a plain login gets the flood.
function TestFlexible:test_no_flood_after_count_or_headers()
	self.srv = start()
	send_to_alice(self.srv, 2)
	for _, ask in ipairs { NS_ITEMS, NS_INFO } do
		local a = login(self.srv, "alice", "flex")
		disco(a, ask, NS)
		a:presence()
		lu.assertEquals(ids(a:collect(1)), {}, ask)
		local b = online(self.srv, "bob", "pda")
		b:send(chat("alice@localhost", "live", "in session"))
		lu.assertEquals(ids(a:read_messages(1, 2)), { "live" })
		b:close()
		-- a second resource, while the first is there
		local second = login(self.srv, "alice", "second")
		second:presence()
		lu.assertEquals(ids(second:collect(1)), {})
		second:close()
		a:close()
	end
	-- nothing was taken from the queue: a client that does not ask gets it all
	lu.assertEquals(ids(offline.collect_offline(self.srv, "alice", 2, nil, 2)), { "m1", "m2" })
end

-- Errors: an unknown node is item-not-found (nothing done), a request for another user's
-- messages is forbidden, and what the XEP does not define is bad-request.
function TestFlexible:test_errors()
	self.srv = start()
	send_to_alice(self.srv, 2)
	local a = login(self.srv, "alice")
	local h = headers(a)
	local nonexistent = ("%016x-%x"):format(999999, 1)
	lu.assertEquals(condition(offline_iq(a, "get", item("view", nonexistent))), "item-not-found")
	lu.assertEquals(condition(offline_iq(a, "get", item("view", "2003-02-27T22:52:37.225Z"))), "item-not-found")
	-- a node from another row's id with the wrong time
	local id = h[1].node:match("^(%x+)%-")
	lu.assertEquals(condition(offline_iq(a, "get", item("view", id .. "-1"))), "item-not-found")
	-- one unknown node among known ones: nothing removed
	local reply = offline_iq(a, "set", function(iq) item("remove", h[1].node)(iq); item("remove", nonexistent)(iq) end)
	lu.assertEquals(condition(reply), "item-not-found")
	lu.assertEquals(#headers(a), 2)
	-- bad requests
	lu.assertEquals(condition(offline_iq(a, "get", item("remove", h[1].node))), "bad-request")
	lu.assertEquals(condition(offline_iq(a, "get", function(iq) iq:tag("purge"):up() end)), "bad-request")
	lu.assertEquals(condition(offline_iq(a, "set", function() end)), "bad-request")
	lu.assertEquals(condition(offline_iq(a, "set", function(iq) iq:tag("fetch"):up():tag("purge"):up() end)), "bad-request")
	lu.assertEquals(condition(offline_iq(a, "set", item("delete", h[1].node))), "bad-request")
	lu.assertEquals(condition(offline_iq(a, "get", item("view", nil))), "bad-request")
	-- addressed to the user's own bare JID: allowed
	lu.assertEquals(offline_iq(a, "get", item("view", h[1].node), "alice@localhost").attr.type, "result")
	a:close()
	-- carol asks for alice's
	local c = login(self.srv, "carol")
	lu.assertEquals(condition(offline_iq(c, "get", function(iq) iq:tag("fetch"):up() end, "alice@localhost")), "forbidden")
	lu.assertEquals(condition(offline_iq(c, "set", function(iq) iq:tag("purge"):up() end, "alice@localhost")), "forbidden")
	lu.assertEquals(condition(offline_iq(c, "set", item("remove", h[1].node), "alice@localhost")), "forbidden")
	c:close()
	a = login(self.srv, "alice")
	lu.assertEquals(#headers(a), 2)
	a:close()
end

-- A contact whose subscription lets it see the account's disco is still refused the node.
function TestFlexible:test_contact_forbidden()
	self.srv = start()
	send_to_alice(self.srv, 1)
	-- carol subscribes to alice, alice approves
	local a, c = online(self.srv, "alice"), online(self.srv, "carol")
	c:send(st.presence({ to = "alice@localhost", type = "subscribe" }))
	assert(a:wait_for(function(el) return el.name == "presence" and el.attr.type == "subscribe" end))
	a:send(st.presence({ to = "carol@localhost", type = "subscribed" }))
	c:ping(); a:ping()
	lu.assertEquals(condition(disco(c, NS_ITEMS, NS, "alice@localhost")), "forbidden")
	lu.assertEquals(condition(disco(c, NS_INFO, NS, "alice@localhost")), "forbidden")
	c:close(); a:close()
end

-- Off: the node is unknown, the feature absent, the iq unhandled, and asking does not stop
-- the flood.
function TestFlexible:test_option_off()
	self.srv = start("offline_flexible_retrieval = false")
	send_to_alice(self.srv, 2)
	local a = login(self.srv, "alice")
	lu.assertNil(features(disco(a, NS_INFO, nil, "localhost"))[NS])
	lu.assertNil(features(disco(a, NS_INFO))[NS])
	lu.assertEquals(condition(disco(a, NS_INFO, NS)), "item-not-found")
	lu.assertEquals(condition(disco(a, NS_ITEMS, NS)), "item-not-found")
	lu.assertEquals(condition(offline_iq(a, "get", function(iq) iq:tag("fetch"):up() end)), "service-unavailable")
	a:presence()
	lu.assertEquals(ids(a:read_messages(2, 1, 5)), { "m1", "m2" })
	a:close()
end

-- Acknowledged delivery: rows leased to a session (sent, unacked) are listed; another session
-- removes one of them; the first ends without acking: the others come back, the removed one
-- does not, and nothing is there twice. A viewed message sent to a session with XEP-0198 that
-- ends unacked is not stored again either.
function TestFlexible:test_remove_leased_and_view_unacked()
	self.srv = start(nil, { modules_enabled = { "smacks" }, global = "smacks_hibernation_time = 1" })
	send_to_alice(self.srv, 3)
	local a = login(self.srv, "alice", "phone")
	assert(a:enable_sm())
	a:presence()
	lu.assertEquals(ids(a:read_messages(3, 1, 5)), { "m1", "m2", "m3" }) -- leased, not acked
	local f = login(self.srv, "alice", "flex")
	assert(f:enable_sm())
	local h = headers(f)
	lu.assertEquals(#h, 3)
	lu.assertEquals(offline_iq(f, "set", item("remove", h[2].node)).attr.type, "result")
	local _, viewed = offline_iq(f, "get", item("view", h[1].node))
	lu.assertEquals(ids(viewed), { "m1" })
	a:close() -- (unacked: its lease is released)
	f:close() -- (the view unacked)
	require "socket".sleep(1.5)
	local got = offline.collect_offline(self.srv, "alice", 2, nil, 2)
	lu.assertEquals(ids(got), { "m1", "m3" })
	local out = select(2, self.srv:prosodyctl("shell", "offline", "count", "alice@localhost"))
	lu.assertStrContains(out, "has 0 offline messages")
end

-- Node ids survive a restart: the headers are the same, and a node from before removes.
function TestFlexible:test_nodes_stable_across_restart()
	self.srv = start()
	send_to_alice(self.srv, 3)
	local a = login(self.srv, "alice")
	local before = headers(a)
	a:close()
	self.srv:restart()
	a = login(self.srv, "alice")
	lu.assertEquals(headers(a), before)
	lu.assertEquals(offline_iq(a, "set", item("remove", before[1].node)).attr.type, "result")
	local _, msgs = offline_iq(a, "get", item("view", before[3].node))
	lu.assertEquals(ids(msgs), { "m3" })
	a:close()
end

-- The memory backend: headers, view, remove, purge.
function TestFlexible:test_memory_backend()
	self.srv = start('offline_backend = "memory"')
	send_to_alice(self.srv, 3)
	local a = login(self.srv, "alice")
	local h = headers(a)
	lu.assertEquals(#h, 3)
	lu.assertEquals(ids(select(2, offline_iq(a, "get", item("view", h[3].node)))), { "m3" })
	lu.assertEquals(offline_iq(a, "set", item("remove", h[1].node)).attr.type, "result")
	lu.assertEquals(count_of(disco(a, NS_INFO, NS)), 2)
	lu.assertEquals(offline_iq(a, "set", function(iq) iq:tag("purge"):up() end).attr.type, "result")
	lu.assertEquals(headers(a), {})
	a:close()
end

-- Two nodes on one PostgreSQL database: the same headers on both; a node from one views and
-- removes on the other.
function TestFlexible:test_postgres_nodes_agree()
	local pg = require "support.postgres".require_server(lu)
	local conf = ('offline_backend = "postgres"\noffline_postgres = %q'):format(
		("host=127.0.0.1 port=%d dbname=%s user=postgres sslmode=disable"):format(pg.port, pg:fresh_database()))
	self.srv = start(conf .. '\noffline_node = "A"')
	local other = start(conf .. '\noffline_node = "B"')
	local ok, err = pcall(function()
		send_to_alice(self.srv, 3)
		local a, b = login(self.srv, "alice"), login(other, "alice")
		local h = headers(a)
		lu.assertEquals(#h, 3)
		lu.assertEquals(headers(b), h)
		lu.assertEquals(ids(select(2, offline_iq(b, "get", item("view", h[2].node)))), { "m2" })
		lu.assertEquals(offline_iq(b, "set", item("remove", h[1].node)).attr.type, "result")
		lu.assertEquals(#headers(a), 2)
		lu.assertEquals(condition(offline_iq(a, "get", item("view", h[1].node))), "item-not-found")
		a:close(); b:close()
	end)
	other:cleanup()
	assert(ok, err)
end

-- slixmpp's xep_0013 plugin (Debian's python3-slixmpp, the system's python3) as the client:
-- count, headers, view one, purge.
function TestFlexible:test_slixmpp_client()
	if not support.sh("/usr/bin/python3 -c 'import slixmpp'") then
		lu.fail("python3-slixmpp is not installed (make deps)")
	end
	self.srv = start()
	send_to_alice(self.srv, 3)
	local ok, out = support.sh(("timeout 60 /usr/bin/python3 spec/support/xep0013_client.py %s %d %s"):format(
		"alice@localhost", self.srv.c2s_port, offline.PW))
	lu.assertTrue(ok, out)
	local json = out:match("RESULT (%b{})")
	assert(json, out)
	lu.assertStrContains(json, '"count": 3')
	lu.assertStrContains(json, '"headers": 3')
	lu.assertStrContains(json, '"names": ["bob@localhost/pda", "bob@localhost/pda", "bob@localhost/pda"]')
	lu.assertStrContains(json, '"viewed": ["body 2"]')
	lu.assertStrContains(json, '"viewed_node_ok": true')
	lu.assertStrContains(json, '"after_purge": 0')
	lu.assertStrContains(json, '"flooded": 0')
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
