-- Delivery through the real Prosody: nothing a sender writes can cost the recipient another
-- message. Messages with attributes Prosody's parser accepts but util.stanza's checks or
-- expat's reserved-prefix rule refuse are delivered intact and in order; a stored row that
-- cannot be turned into a stanza is set aside once in the recipient's own queue.

local lu = require "luaunit"
local offline = require "support.offline"
local core = require "offline_store.core"

local online, login, chat, ids, delays = offline.online, offline.login, offline.chat, offline.ids, offline.delays
local NS_XML = "http://www.w3.org/XML/1998/namespace"

local function start()
	return offline.start { users = { alice = offline.PW, bob = offline.PW, carol = offline.PW, dave = offline.PW } }
end

-- Logs `user` in, sends presence, returns the messages that arrive within `seconds`
-- and whether the stream still answers a ping afterwards.
local function login_collect(srv, user, seconds)
	local c = login(srv, user, "fresh" .. math.random(1e9))
	c:presence()
	local got = offline.messages(c:collect(seconds or 1))
	local alive = pcall(c.ping, c)
	c:close()
	return got, alive
end

-- `prosodyctl shell ...` on the running server: its output, which must say it worked.
local function shell(srv, ...)
	local ok, out = srv:prosodyctl("shell", ...)
	lu.assertTrue(ok, out)
	return out
end

local function count_in_log(srv, text)
	local _, n = srv:log():gsub(text:gsub("%p", "%%%0"), "")
	return n
end

-- How many messages the server says `user` has queued (through its own connection:
-- a second connection to the file of a daemonized Prosody is not safe, see below).
local function queued(srv, user)
	local out = shell(srv, "offline", "count", user .. "@localhost")
	return tonumber((assert(out:match("has (%d+) offline messages"), out)))
end

-- Runs fn(db) on the server's store file with the server stopped, then starts it
-- again. (Prosody -D forks after loading modules; had sqlite taken its POSIX locks
-- before the fork, the daemon would not hold them, and a second connection closing
-- next to it would take the WAL away from under it. Stopped, nothing can race.)
local function with_file(srv, fn)
	srv:stop()
	local db = assert(core.open_sqlite(srv.dir .. "/data/offline.sqlite"))
	local ok, err = pcall(fn, db)
	db:close()
	srv:restart()
	assert(ok, err)
end

---------------------------------------------------------------------------------------------------
TestDeliveryOddAttributes = {}

function TestDeliveryOddAttributes:server()
	if not TestDeliveryOddAttributes.srv then TestDeliveryOddAttributes.srv = start() end
	return TestDeliveryOddAttributes.srv
end

function TestDeliveryOddAttributes.teardownClass()
	if TestDeliveryOddAttributes.srv then TestDeliveryOddAttributes.srv:cleanup() end
	TestDeliveryOddAttributes.srv = nil
end

-- A namespaced attribute whose namespace URI holds a space (and one with ' " < > &):
-- accepted by Prosody's parser, refused by util.stanza's attribute-name check.
function TestDeliveryOddAttributes:test_namespace_uri_with_space_delivered_in_order()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(chat("bob@localhost", "n1", "before"))
	a:send(chat("bob@localhost", "odd", "odd one", function(m)
		m.attr["urn:a b\1x"] = "1"
		m:tag("x", { xmlns = "urn:example:odd" }):up()
		m.tags[#m.tags].attr["urn:q'\"<>& z\1y"] = "v'<&>\""
	end))
	a:send(chat("bob@localhost", "n2", "after"))
	lu.assertEquals(#offline.messages(a:ping() or {}), 0, "no error back to the sender")
	local got, alive = login_collect(srv, "bob")
	lu.assertEquals(ids(got), { "n1", "odd", "n2" })
	local odd = got[2]
	lu.assertEquals(odd.attr["urn:a b\1x"], "1")
	lu.assertEquals(odd:get_child("x", "urn:example:odd").attr["urn:q'\"<>& z\1y"], "v'<&>\"")
	lu.assertEquals(odd:get_child_text("body"), "odd one")
	lu.assertEquals(#delays(odd), 1)
	lu.assertTrue(alive, "the recipient's stream survives")
	lu.assertEquals(#login_collect(srv, "bob"), 0, "delivered once, nothing left")
	lu.assertEquals(queued(srv, "bob"), 0, "nothing set aside")
	a:close()
end

-- xml:NAME attributes other than the four Prosody's stream parser names itself
-- (lang, space, base, id) reach it as "XML-namespace\1NAME"; util.stanza writes those
-- with a prefix bound to the XML namespace, which expat refuses.
function TestDeliveryOddAttributes:test_xml_prefixed_attributes_delivered_intact()
	local srv = self:server()
	local a = online(srv, "alice")
	a:send(chat("bob@localhost", "x1", "before"))
	a:send("<message to='bob@localhost' type='chat' id='xf' xml:foo='bar' xml:lang='en'>"
		.. "<body>with xml:foo</body><x xmlns='urn:example:x' xml:other='o&amp;' xml:space='preserve'/></message>")
	a:send(chat("bob@localhost", "x2", "after"))
	a:ping()
	local got, alive = login_collect(srv, "bob")
	lu.assertEquals(ids(got), { "x1", "xf", "x2" })
	local m = got[2]
	lu.assertEquals(m.attr[NS_XML .. "\1foo"], "bar")
	lu.assertEquals(m.attr["xml:lang"], "en")
	local x = m:get_child("x", "urn:example:x")
	lu.assertEquals(x.attr[NS_XML .. "\1other"], "o&")
	lu.assertEquals(x.attr["xml:space"], "preserve")
	lu.assertEquals(m:get_child_text("body"), "with xml:foo")
	lu.assertTrue(alive, "the recipient's stream survives")
	lu.assertEquals(queued(srv, "bob"), 0, "nothing set aside")
	a:close()
end

---------------------------------------------------------------------------------------------------
TestDeliveryDamagedRow = {}

function TestDeliveryDamagedRow:setUp() self.srv = start() end
function TestDeliveryDamagedRow:tearDown() self.srv:cleanup() end

local DAMAGED = "<message to='bob@localhost' id='damaged'><body>cut off"

local function store_damaged(db, host, user)
	assert(db:store(host, user, "mallory@elsewhere", DAMAGED, (os.time() - 60) * 1000000))
end

function TestDeliveryDamagedRow:test_set_aside_once_in_the_users_queue()
	local srv = self.srv
	local a = online(srv, "alice")
	a:send(chat("bob@localhost", "d1", "before"))
	a:ping()
	a:close()
	with_file(srv, function(db)
		store_damaged(db, "localhost", "bob")
		store_damaged(db, "localhost", "carol")
	end)
	a = online(srv, "alice")
	a:send(chat("bob@localhost", "d2", "after"))
	a:ping()
	local got, alive = login_collect(srv, "bob")
	lu.assertEquals(ids(got), { "d1", "d2" }, "the other rows are delivered, in order")
	lu.assertTrue(alive)
	lu.assertEquals(count_in_log(srv, "cannot be delivered"), 1)
	-- kept in bob's own queue: counted, listed and marked
	lu.assertEquals(queued(srv, "bob"), 1)
	local listing = shell(srv, "offline", "list", "bob@localhost")
	lu.assertStrContains(listing, "from mallory@elsewhere")
	lu.assertStrContains(listing, "[undeliverable]")
	-- not retried, nor logged again, at the next logins; new messages still flow
	lu.assertEquals(#login_collect(srv, "bob"), 0)
	a:send(chat("bob@localhost", "d3", "later"))
	a:ping()
	lu.assertEquals(ids((login_collect(srv, "bob"))), { "d3" })
	lu.assertEquals(count_in_log(srv, "cannot be delivered"), 1, "logged once")
	lu.assertEquals(queued(srv, "bob"), 1)
	-- goes with delete
	lu.assertStrContains(shell(srv, "offline", "delete", "bob@localhost"), "Removed 1 messages")
	lu.assertEquals(queued(srv, "bob"), 0)
	-- and with the account
	lu.assertEquals(#login_collect(srv, "carol"), 0)
	lu.assertEquals(queued(srv, "carol"), 1)
	shell(srv, "user", "delete", "carol@localhost")
	a:close()
	with_file(srv, function(db)
		lu.assertEquals(db:count("localhost", "carol"), 0, "removed with the account")
		lu.assertEquals(db:count("localhost!unparsable", "bob"), 0, "never kept under another key")
		lu.assertEquals(db:count("localhost!unparsable", "carol"), 0)
	end)
end

-- Rows an earlier version kept under "HOST!unparsable" (no limit, kept past the
-- account) are moved into their users' queues, set aside, when the module loads.
function TestDeliveryDamagedRow:test_old_quarantine_adopted_at_load()
	local srv = self.srv
	with_file(srv, function(db) store_damaged(db, "localhost!unparsable", "dave") end)
	lu.assertEquals(queued(srv, "dave"), 1)
	lu.assertStrContains(shell(srv, "offline", "list", "dave@localhost"), "[undeliverable]")
	lu.assertEquals(#login_collect(srv, "dave"), 0, "set aside: not delivered")
	lu.assertEquals(count_in_log(srv, "cannot be delivered"), 0)
	with_file(srv, function(db)
		lu.assertEquals(db:count("localhost!unparsable", "dave"), 0)
		local items = db:list("localhost", "dave")
		lu.assertEquals(#items, 1)
		lu.assertEquals({ items[1].xml, items[1].meta }, { DAMAGED, core.SET_ASIDE })
	end)
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
