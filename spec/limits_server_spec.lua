-- The byte limit (offline_access_max_user_bytes) and the over-limit policies
-- (offline_over_limit: bounce, drop, drop_oldest) through the real Prosody and a real client.
-- Servers are started lazily per class and stopped in teardownClass.

local lu = require "luaunit"
local offline = require "support.offline"

local online, login, chat = offline.online, offline.login, offline.chat
local messages, ids, collect_offline, error_of = offline.messages, offline.ids, offline.collect_offline, offline.error_of

local FULL = { type = "error", etype = "wait", code = "500", condition = "resource-constraint",
	text = "Your contact offline message queue is full. The message has been discarded." }

local with_server = offline.with_server

-- A chat message whose stored form is about 300 bytes (a body of 200).
local function chat300(to, id)
	return chat(to, id, (id .. " "):rep(200):sub(1, 200))
end

-- Sends n messages id prefix..1 .. prefix..n (of ~300 bytes when big) and returns the
-- messages that came back.
local function send(a, to, n, prefix, big)
	for i = 1, n do a:send((big and chat300 or chat)(to, prefix .. i, "m" .. i)) end
	return messages(a:ping())
end

local function log_count(srv, pattern)
	local _, n = srv:log():gsub(pattern, "")
	return n
end

---------------------------------------------------------------------------------------------------
TestByteLimit = with_server(function()
	return {
		global = 'admins = { "root@localhost" }',
		host = [[
access = { kilobyte = { { acl = "admin", value = "infinity" }, { acl = "all", value = 1000 } } }
offline_access_max_user_bytes = "kilobyte"
]],
	}
end)

function TestByteLimit:test_fourth_message_of_300_bytes_is_refused()
	local srv = self:server()
	local a = online(srv, "alice")
	local back = send(a, "bob@localhost", 4, "b", true)
	lu.assertEquals(ids(back), { "b4" }, "3 x ~300 bytes fit in 1,000; the 4th does not")
	lu.assertEquals(error_of(back[1]), FULL, "the count limit's error")
	lu.assertEquals(back[1].attr.from, "bob@localhost")
	lu.assertEquals(ids(send(a, "bob@localhost", 2, "small")), { "small1", "small2" },
		"even a small one is refused while the bytes are used up")
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "b1", "b2", "b3" })
	lu.assertEquals(#send(a, "bob@localhost", 3, "again", true), 0, "delivered: room again")
	lu.assertEquals(#collect_offline(srv, "bob"), 3)
	a:close()
end

function TestByteLimit:test_admin_clause()
	local srv = self:server()
	local a = online(srv, "alice")
	lu.assertEquals(#send(a, "root@localhost", 6, "r", true), 0, "admins: infinity bytes")
	lu.assertEquals(#collect_offline(srv, "root"), 6)
	a:close()
end

---------------------------------------------------------------------------------------------------
TestDrop = with_server(function()
	return {
		host = [[
access = { three = { { acl = "all", value = 3 } }, kilobyte = { { acl = "all", value = 1000 } } }
offline_access_max_user_messages = "three"
offline_access_max_user_bytes = "kilobyte"
offline_over_limit = "drop"
]],
	}
end)

function TestDrop:test_over_the_limit_is_dropped_silently()
	local srv = self:server()
	local a = online(srv, "alice")
	local logged = log_count(srv, "a message was dropped")
	lu.assertEquals(#send(a, "bob@localhost", 5, "d"), 0, "the sender hears nothing")
	lu.assertEquals(#send(a, "carol@localhost", 1, "huge", true) + #send(a, "carol@localhost", 1, "big", true), 0)
	a:send(chat("carol@localhost", "over", ("x"):rep(1200)))
	lu.assertEquals(#messages(a:ping()), 0, "larger than the whole quota: dropped too, silently")
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "d1", "d2", "d3" }, "the first three are kept")
	lu.assertEquals(ids(collect_offline(srv, "carol")), { "huge1", "big1" })
	lu.assertTrue(log_count(srv, "a message was dropped") > logged, "the log says so (once a minute)")
	a:close()
end

---------------------------------------------------------------------------------------------------
TestDropOldest = with_server(function()
	return {
		modules_enabled = { "smacks" },
		global = 'smacks_hibernation_time = 2\nadmins = { "root@localhost" }',
		host = [[
access = {
	three = { { acl = "admin", value = "infinity" }, { acl = "all", value = 3 } },
	bytes = { { acl = "all", value = 2000 } },
}
offline_access_max_user_messages = "three"
offline_access_max_user_bytes = "bytes"
offline_over_limit = "drop_oldest"
offline_delivery_page = 2
]],
	}
end)

function TestDropOldest:test_the_newest_three_of_five()
	local srv = self:server()
	local a = online(srv, "alice")
	lu.assertEquals(#send(a, "bob@localhost", 5, "n"), 0, "no error: room is made")
	lu.assertEquals(ids(collect_offline(srv, "bob")), { "n3", "n4", "n5" }, "the recipient gets the most recent")
	lu.assertEquals(#send(a, "root@localhost", 5, "r"), 0)
	lu.assertEquals(ids(collect_offline(srv, "root")), { "r1", "r2", "r3", "r4", "r5" }, "an admin's infinity evicts nothing")
	a:close()
end

function TestDropOldest:test_larger_than_the_whole_quota_is_refused_with_the_error()
	local srv = self:server()
	local a = online(srv, "alice")
	lu.assertEquals(#send(a, "carol@localhost", 2, "c"), 0)
	a:send(chat("carol@localhost", "huge", ("x"):rep(2500)))
	local back = messages(a:ping())
	lu.assertEquals(ids(back), { "huge" })
	lu.assertEquals(error_of(back[1]), FULL)
	lu.assertEquals(ids(collect_offline(srv, "carol")), { "c1", "c2" }, "nothing was evicted for it")
	a:close()
end

-- A session with XEP-0198 holds a lease on the first page (2 messages, not acked) and turns
-- its priority negative, so messages to the bare JID are stored again meanwhile: they evict
-- the oldest rows that are not leased; the leased ones stay and are delivered later.
function TestDropOldest:test_leased_rows_are_not_evicted()
	local srv = self:server()
	local a = online(srv, "alice")
	lu.assertEquals(#send(a, "dave@localhost", 3, "m"), 0)
	local phone = login(srv, "dave", "phone")
	assert(phone:enable_sm())
	phone:presence()
	lu.assertEquals(ids(phone:read_messages(10, 1)), { "m1", "m2" }, "one page, leased until acked")
	phone:presence(-1)
	phone:ping()
	lu.assertEquals(#send(a, "dave@localhost", 2, "n"), 0, "no error")
	phone:drop() -- never acked: the lease ends with the session
	local got
	local deadline = os.time() + 15
	repeat -- (until mod_smacks has given up the hibernating session and its lease)
		got = ids(collect_offline(srv, "dave", 1))
	until #got > 0 or os.time() > deadline
	lu.assertEquals(got, { "m1", "m2", "n2" },
		"m3 and then n1 were evicted; the leased m1 and m2 were not")
	a:close()
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
