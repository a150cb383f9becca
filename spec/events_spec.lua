-- The module's events for other modules and site plugins (doc/manual.md, "Events for other
-- modules"), through a real Prosody: the manual's example plugin, taken from the manual's
-- text, vetoes and rewrites; a probe plugin logs every payload it is given. On sqlite, memory
-- and PostgreSQL.

local lu = require "luaunit"
local offline = require "support.offline"
local support = require "support.util"
local postgres = require "support.postgres"

local online, login, chat, messages = offline.online, offline.login, offline.chat, offline.messages

-- The manual's example plugin, as the manual prints it.
local function manual_example()
	local text = assert(support.read(offline.ROOT .. "/doc/manual.md"))
	return assert(text:match("```lua\n(%-%- mod_offline_filter%.lua.-)```"), "no example plugin in doc/manual.md")
end

-- Logs each event's payload as one line "PROBE <event> <fields>".
local PROBE = [[
local function line(...) module:log("info", ...) end
module:hook("offline-store/stored", function(e)
	line("PROBE stored %s %s %s %s", e.username, math.type(e.id), tostring(e.count), tostring(e.stanza.attr.id))
end)
module:hook("offline-store/rejected", function(e)
	line("PROBE rejected %s %s %s %s", e.username, e.reason, tostring(e.detail), tostring(e.stanza.attr.id))
end)
module:hook("offline-store/delivered", function(e)
	line("PROBE delivered %s %s %s", e.username, tostring(e.count), tostring(e.session.full_jid))
end)
module:hook("offline-store/acked", function(e)
	line("PROBE acked %s %s %s", e.username, tostring(e.count), tostring(e.session.full_jid))
end)
]]

local function probe_lines(srv)
	local out = {}
	for l in srv:log():gmatch("PROBE ([^\n]*)") do out[#out + 1] = l end
	return out
end

local function start(backend)
	local dir = support.tmpdir()
	support.write(dir .. "/mod_offline_filter.lua", manual_example())
	support.write(dir .. "/mod_offline_probe.lua", PROBE)
	local srv = offline.start {
		plugin_paths = { dir },
		modules_enabled = { "smacks", "offline_filter", "offline_probe" },
		host = 'spam_words = { "buy now" }\n'
			.. 'access = { max_user_offline_messages = { { acl = "all", value = 2 } } }\n'
			.. ("offline_backend = %q\n"):format(backend)
			.. (backend == "postgres" and ("offline_postgres = %q"):format(postgres.require_server(lu):fresh_conninfo())
				or ""),
	}
	srv.plugin_dir = dir
	return srv
end

local function with_backend(backend)
	local T = {}
	function T:server()
		if not T.srv then T.srv = start(backend) end
		return T.srv
	end
	function T.teardownClass()
		if T.srv then
			T.srv:cleanup()
			support.rmrf(T.srv.plugin_dir)
			T.srv = nil
		end
	end

	-- The manual's example: a message with a spam word is not stored and its sender hears
	-- nothing; the one stored carries the plugin's mark; the plugin's log lines are there.
	function T:test_manual_example_vetoes_and_rewrites()
		local srv = self:server()
		local a = online(srv, "alice")
		a:send(chat("bob@localhost", "e1", "hello bob"))
		a:send(chat("bob@localhost", "e2", "buy now, cheap"))
		lu.assertEquals(#messages(a:ping()), 0, "the vetoed message's sender is told nothing")
		a:close()
		local got = offline.collect_offline(srv, "bob", 3, nil, 1)
		lu.assertEquals(offline.ids(got), { "e1" })
		lu.assertNotNil(got[1]:get_child("filtered", "urn:example:offline-filter"), "stored as rewritten")
		local log = srv:log()
		lu.assertStrContains(log, "Not queued for bob: policy spam")
		lu.assertStrContains(log, "(1 waiting)")
	end

	-- Every event's payload: stored (with the row id and the queue length), rejected for a
	-- duplicate, the limit and a chat-state-only message, delivered and acked.
	function T:test_payloads()
		local srv = self:server()
		local a = online(srv, "alice")
		local function with_origin_id(m) m:tag("origin-id", { xmlns = "urn:xmpp:sid:0", id = "o1" }):up() end
		a:send(chat("carol@localhost", "c1", nil, function(m) m:text_tag("body", "one"); with_origin_id(m) end))
		a:send(chat("carol@localhost", "c1b", nil, function(m) m:text_tag("body", "one"); with_origin_id(m) end))
		a:send(chat("carol@localhost", "c2", "two"))
		a:send(chat("carol@localhost", "c3", "three"))
		a:send(chat("carol@localhost", "c4", nil, function(m)
			m:tag("composing", { xmlns = "http://jabber.org/protocol/chatstates" }):up()
		end))
		local replies = messages(a:ping())
		lu.assertEquals(offline.ids(replies), { "c3" }, "only the message over the limit is answered")
		a:close()

		local c = login(srv, "carol", "phone")
		assert(c:enable_sm())
		c:presence()
		local got = c:read_messages(2, 1, 10)
		lu.assertEquals(offline.ids(got), { "c1", "c2" })
		c:ack()
		c:ping()
		c:close()

		local lines = probe_lines(srv)
		local expected = {
			"stored carol integer 1 c1",
			"rejected carol duplicate nil c1b",
			"stored carol integer 2 c2",
			"rejected carol limit nil c3",
			"rejected carol policy chatstate c4",
			"delivered carol 2 carol@localhost/phone",
			"acked carol 2 carol@localhost/phone",
		}
		local carol = {}
		for _, l in ipairs(lines) do
			if l:find(" carol ", 1, true) then carol[#carol + 1] = l end
		end
		-- (group commit: a stored event comes when the batch commits, which may be after a
		-- later message's rejection)
		table.sort(carol)
		table.sort(expected)
		lu.assertEquals(carol, expected)
	end
	return T
end

TestEventsSqlite = with_backend("sqlite")
TestEventsMemory = with_backend("memory")
-- (pipelined stores: a refusal is decided, and told, when the batch commits)
TestEventsPostgres = with_backend("postgres")
