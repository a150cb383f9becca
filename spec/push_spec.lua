-- XEP-0357 push notifications through mod_cloud_notify (bundled in Prosody 13; Debian's
-- prosody-modules on 0.12), through a real Prosody: a stored message wakes the phone once,
-- a message that is not stored does not, also with group commit and acknowledged delivery.
-- The app server is an XMPP entity on the same server (a client's full JID), which records
-- the pubsub publishes mod_cloud_notify sends it.

local lu = require "luaunit"
local offline = require "support.offline"
local st = require "util.stanza"

local online, login, chat, messages = offline.online, offline.login, offline.chat, offline.messages

local APP = "push@localhost/app"
local NS_PUSH = "urn:xmpp:push:0"

local USERS = {}
for _, u in ipairs { "alice", "bob", "carol", "dave", "erin", "push" } do USERS[u] = offline.PW end

-- Pushes the app server received for `node` within `seconds`.
local function pushes(app, node, seconds)
	local out = {}
	for _, s in ipairs(app:collect(seconds or 1.5)) do
		local publish = s.name == "iq" and s:find("{http://jabber.org/protocol/pubsub}pubsub/publish")
		if publish and publish.attr.node == node then
			out[#out + 1] = s
			app:send(st.reply(s))
		end
	end
	return out
end

-- `user` enables push on its phone (node "n-USER"), then goes offline.
local function enable_push(srv, user)
	local c = online(srv, user, "phone")
	local iq = st.iq({ type = "set", id = "push1" }):tag("enable", { xmlns = NS_PUSH, jid = APP, node = "n-" .. user })
	c:send(iq)
	local reply = c:wait_for(function(e) return e.name == "iq" and e.attr.id == "push1" end)
	assert(reply and reply.attr.type == "result", "push enable refused")
	c:close()
end

-- The summary form's fields of a push.
local function summary(push)
	local fields = {}
	local form = push:find("{http://jabber.org/protocol/pubsub}pubsub/publish/item/{urn:xmpp:push:0}notification/{jabber:x:data}x")
	for _, f in ipairs(form and form.tags or {}) do
		if f.name == "field" then fields[f.attr.var] = f:get_child_text("value") end
	end
	return fields
end

TestPush = {}

function TestPush.setupClass()
	TestPush.srv = offline.start {
		users = USERS,
		modules_enabled = { "cloud_notify", "smacks" },
		host = [[
acl = { big = { "dave@localhost", "erin@localhost" } }
access = { max_user_offline_messages = { { acl = "big", value = "infinity" }, { acl = "all", value = 2 } } }
]],
	}
	TestPush.app = online(TestPush.srv, "push", "app")
end

function TestPush.teardownClass()
	if TestPush.srv then TestPush.srv:cleanup(); TestPush.srv = nil end
end

-- One stored message: one push, the one mod_cloud_notify sends (message count, the
-- placeholder body of an important message).
function TestPush:test_stored_message_pushes_once()
	local srv, app = self.srv, self.app
	enable_push(srv, "alice")
	local b = online(srv, "bob")
	b:send(chat("alice@localhost", "a1", "hello"))
	lu.assertEquals(#messages(b:ping()), 0)
	local got = pushes(app, "n-alice")
	lu.assertEquals(#got, 1)
	lu.assertEquals(got[1].attr.from, "localhost")
	local f = summary(got[1])
	lu.assertEquals(f["message-count"], "1")
	lu.assertEquals(f["last-message-body"], "New Message!")
	b:close()
end

-- Not stored (over the limit, chat-state-only, no-store hint): no push.
function TestPush:test_not_stored_no_push()
	local srv, app = self.srv, self.app
	enable_push(srv, "carol")
	local b = online(srv, "bob")
	b:send(chat("carol@localhost", "c1", "one"))
	b:send(chat("carol@localhost", "c2", "two"))
	lu.assertEquals(#pushes(app, "n-carol"), 2)
	b:send(chat("carol@localhost", "c3", "over the limit"))
	b:send(chat("carol@localhost", "c4", nil, function(m)
		m:tag("composing", { xmlns = "http://jabber.org/protocol/chatstates" }):up()
	end))
	b:send(chat("carol@localhost", "c5", "not to be kept", function(m)
		m:text_tag("body", "not to be kept"):tag("no-store", { xmlns = "urn:xmpp:hints" }):up()
	end))
	lu.assertEquals(offline.ids(messages(b:ping())), { "c3" }, "the limit's error")
	lu.assertEquals(#pushes(app, "n-carol"), 0, "nothing pushed for messages not stored")
	b:close()
end

-- Group commit: messages sent in one write share a commit; each stored one pushes once,
-- and every push comes after its message is committed.
function TestPush:test_group_commit_one_push_each()
	local srv, app = self.srv, self.app
	enable_push(srv, "dave")
	local b = online(srv, "bob")
	local burst = {}
	for i = 1, 20 do burst[i] = tostring(chat("dave@localhost", "d" .. i, "m" .. i)) end
	b.sock:send(table.concat(burst))
	local first = app:wait_for(function(e) return e.name == "iq" and e:find("{http://jabber.org/protocol/pubsub}pubsub") end)
	assert(first, "no push")
	local rows = tonumber(offline.sql(srv, "SELECT count FROM queue WHERE user = 'dave'"):match("%d+"))
	lu.assertTrue(rows >= 1, "the push came before its message was committed")
	lu.assertEquals(1 + #pushes(app, "n-dave", 2), 20)
	b:close()
end

-- Acknowledged delivery: a session that ends without acking its messages puts them back
-- in the queue; the phone learns it once, not once per message.
function TestPush:test_unacked_back_in_queue_one_push()
	local srv, app = self.srv, self.app
	enable_push(srv, "erin")
	local b = online(srv, "bob")
	for i = 1, 5 do b:send(chat("erin@localhost", "e" .. i, "m" .. i)) end
	b:ping()
	lu.assertEquals(#pushes(app, "n-erin"), 5)
	local c = login(srv, "erin", "laptop")
	assert(c:enable_sm())
	c:presence()
	lu.assertEquals(#c:read_messages(5, 1, 10), 5)
	c:close() -- without acking
	lu.assertEquals(#pushes(app, "n-erin"), 1, "one push for the messages back in the queue")
	lu.assertEquals(#offline.collect_offline(srv, "erin", 3, nil, 5), 5, "still queued")
	b:close()
end
