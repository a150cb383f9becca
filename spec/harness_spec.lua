-- Self-test of the integration harness (spec/support/prosody.lua, spec/support/xmpp.lua) against
-- Prosody (Debian's 0.12.3, or 13) with only its bundled modules: start/stop/restart, login, a chat message.
-- Run from the repo root: lua5.4 spec/harness_spec.lua [-v]   (a runner sets _RUNNER = true).

package.path = "spec/?.lua;" .. package.path

local lu = require "luaunit"
local http = require "socket.http"
local server = require "support.prosody"
local xmpp = require "support.xmpp"

local os_execute = os.execute

local USERS = { alice = "alicepw", bob = "bobpw" }

local function gone(pid)
	return os_execute("kill -0 " .. pid .. " 2>/dev/null") ~= true
end

TestHarness = {}

-- One shared server for the class; started lazily in setUp so a start failure is reported as a
-- test error (luaunit 3.4 cannot report setupClass errors) and not retried for every test.
local srv, start_err
local clients = {}

function TestHarness.setUp()
	if not srv and not start_err then
		local ok, res = pcall(server.start, { users = USERS, statistics = true, modules_enabled = { "smacks" } })
		if ok then srv = res else start_err = res end
	end
	if start_err then error(start_err, 0) end
end

function TestHarness.tearDown()
	for i = #clients, 1, -1 do
		clients[i]:drop()
		clients[i] = nil
	end
end

function TestHarness.teardownClass()
	if srv then srv:cleanup() end
	srv = nil
end

local function login(user, resource)
	local c, err = xmpp.connect{ port = srv.c2s_port, user = user, password = USERS[user], resource = resource }
	lu.assertNotNil(c, err)
	clients[#clients + 1] = c
	return c
end

function TestHarness.test_server_fields()
	lu.assertStrContains(srv.config, srv.dir)
	lu.assertIsNumber(srv.c2s_port)
	lu.assertIsNumber(srv.http_port)
	lu.assertIsNumber(srv:pid())
	lu.assertStrContains(srv:log(), "Activated service 'c2s'")
end

function TestHarness.test_login_binds_full_jid()
	local a = login("alice", "laptop")
	lu.assertEquals(a.jid, "alice@localhost/laptop")
end

function TestHarness.test_wrong_password_fails()
	local c, err = xmpp.connect{ port = srv.c2s_port, user = "alice", password = "wrong" }
	lu.assertNil(c)
	lu.assertStrContains(err, "not-authorized")
end

function TestHarness.test_chat_message_delivered()
	local a = login("alice", "laptop")
	local b = login("bob", "phone")
	a:presence()
	b:presence(5)
	a:ping(); b:ping() -- both presences processed

	a:send(xmpp.stanza.message({ to = "bob@localhost", type = "chat", id = "m1" }, "hello bob"))
	local m = b:wait_for(function (el) return el.name == "message" end, 5)
	lu.assertNotNil(m, "bob got no message")
	lu.assertEquals(m.attr.from, "alice@localhost/laptop")
	lu.assertEquals(m.attr.id, "m1")
	lu.assertEquals(m:get_child_text("body"), "hello bob")
end

function TestHarness.test_ping_is_a_barrier()
	local a = login("alice", "r1")
	a:presence()
	local before = a:ping()
	-- our own initial presence is reflected back before the pong
	local saw_self = false
	for _, el in ipairs(before) do
		if el.name == "presence" and el.attr.from == a.jid then saw_self = true end
	end
	lu.assertTrue(saw_self)
	lu.assertNil(a:receive(0.2))
end

function TestHarness.test_admin_shell_version()
	local ok, out = srv:prosodyctl("shell", "server", "version")
	lu.assertTrue(ok, out)
	-- the server that answers is the version the harness launched (the system's or PROSODY=13)
	lu.assertStrContains(out, "OK: " .. server.version)
end

-- start() returns once every host is up, also on 13, which forks and opens c2s before its last
-- hosts are activated: what a spec reads in the log right after start is complete.
function TestHarness.test_started_after_every_host()
	local hosts = {}
	for i = 1, 20 do hosts[i] = ("VirtualHost %q"):format("h" .. i .. ".localhost") end
	local s = server.start { host = table.concat(hosts, "\n") }
	local log = s:log()
	s:cleanup()
	lu.assertStrContains(log, "Host 'h20.localhost' now set to use user provider")
end

function TestHarness.test_stream_management()
	local a = login("alice", "sm")
	local b = login("bob", "sm")
	local enabled, err = b:enable_sm()
	lu.assertNotNil(enabled, err)
	lu.assertEquals(enabled.attr.resume, "true")
	lu.assertIsString(b.sm_id)
	b:presence()
	a:send(xmpp.stanza.message({ to = b.jid, type = "chat", id = "sm1" }, "counted"))
	lu.assertNotNil(b:wait_for(function (el) return el.attr.id == "sm1" end))
	b:request_ack()
	local ack = b:wait_for(function (el) return el.name == "a" and el.attr.xmlns == "urn:xmpp:sm:3" end)
	lu.assertNotNil(ack, "no <a/>")
	lu.assertEquals(tonumber(ack.attr.h), 1) -- the server has handled our one stanza, the presence
	lu.assertTrue(b.sm_h >= 2) -- we received at least our own presence and the message
	b:ack()
	b:ping()
end

function TestHarness.test_metrics_endpoint()
	local body, code = http.request("http://127.0.0.1:" .. srv.http_port .. "/metrics")
	lu.assertEquals(code, 200)
	lu.assertStrContains(body, "prosody_")
end

-- Own server: stop/kill/restart must not leave processes behind.
function TestHarness.test_stop_kill_restart_leave_no_process()
	local s = server.start{ users = { carol = "cpw" } }
	local ok, err = pcall(function ()
		local pid = s:pid()
		lu.assertNotEquals(s.c2s_port, srv.c2s_port) -- two servers side by side
		s:kill()
		lu.assertTrue(gone(pid), "killed prosody still exists")
		lu.assertNil(s:pid(), "stale pidfile left")

		s:restart() -- same dir/ports; data survives
		local c = assert(xmpp.connect{ port = s.c2s_port, user = "carol", password = "cpw" })
		c:close()
		pid = s:pid()
		s:stop()
		lu.assertTrue(gone(pid), "stopped prosody still exists")
		lu.assertFalse(s:running())
	end)
	s:cleanup()
	if not os.getenv("KEEP_PROSODY_DIR") then
		lu.assertNotEquals(os_execute("test -e " .. s.dir), true, "dir not removed")
	end
	if not ok then error(err, 0) end
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
