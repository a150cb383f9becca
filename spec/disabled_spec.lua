-- Disabled accounts (Prosody 13): a message for a disabled account is not stored and is
-- bounced as for an account that does not exist; the queue it had is kept and delivered
-- after it is enabled again. Through a real Prosody 13, accounts disabled and enabled with
-- `prosodyctl shell user disable|enable`.

local lu = require "luaunit"
local offline = require "support.offline"
local server = require "support.prosody"

local online, chat, messages = offline.online, offline.chat, offline.messages

TestDisabled = {}

function TestDisabled:setUp()
	lu.skipIf(server.branch == "0.12", "Prosody 0.12 has no disabled accounts (user-disabled and user-enabled are 13's)")
	if not TestDisabled.srv then TestDisabled.srv = offline.start { host = 'authentication = "internal_hashed"' } end -- (internal_plain cannot disable)
end

function TestDisabled.teardownClass()
	if TestDisabled.srv then TestDisabled.srv:cleanup(); TestDisabled.srv = nil end
end

local function shell(srv, ...)
	local ok, out = srv:prosodyctl("shell", ...)
	assert(ok, out)
	return out
end

-- What the sender gets back for a message to `to`: the ids and conditions of the errors.
local function bounces(a, to, id)
	a:send(chat(to, id, "hello " .. id))
	local out = {}
	for _, m in ipairs(messages(a:ping())) do
		out[#out + 1] = m.attr.id .. " " .. offline.error_of(m).condition .. " " .. offline.error_of(m).etype
	end
	return out
end

function TestDisabled:test_bounced_like_no_account_and_queue_kept()
	local srv = self.srv
	local a = online(srv, "alice")
	lu.assertEquals(bounces(a, "bob@localhost", "k1"), {}, "stored while bob is enabled")
	shell(srv, "user", "disable", "bob@localhost")
	local disabled = bounces(a, "bob@localhost", "d1")
	local missing = bounces(a, "nobody@localhost", "n1")
	lu.assertEquals(missing, { "n1 service-unavailable cancel" })
	lu.assertEquals(disabled, { "d1 service-unavailable cancel" }, "bounced as for no account")
	local ok, count = srv:prosodyctl("shell", "offline", "count", "bob@localhost")
	assert(ok, count)
	lu.assertStrContains(count, "bob@localhost has 1 offline messages", "the queue is kept, the bounced one not in it")
	shell(srv, "user", "enable", "bob@localhost")
	lu.assertEquals(bounces(a, "bob@localhost", "k2"), {}, "stored again once enabled")
	a:close()
	local got = offline.collect_offline(srv, "bob", 3, nil, 2)
	lu.assertEquals(offline.ids(got), { "k1", "k2" })
end
