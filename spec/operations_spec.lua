-- Operations through the real tools: metrics scraped from mod_http_openmetrics,
-- the live shell (`prosodyctl shell offline ...`), `prosodyctl mod_offline ...` next to a
-- running server, the expiry sweep run by mod_cron, and removal of deleted accounts' queues.

local lu = require "luaunit"
local offline = require "support.offline"
local xmpp = require "support.xmpp"
local support = require "support.util"
local st = require "util.stanza"
local socket = require "socket"
local http = require "socket.http"

local online, sql = offline.online, offline.sql
local PW = offline.PW
local server = require "support.prosody"

local function start(opts)
	opts.users = { alice = PW, bob = PW, carol = PW, dave = PW }
	return offline.start(opts)
end

local function send(c, to, id, build)
	local m = st.message({ to = to, type = "chat", id = id })
	if build then build(m) else m:tag("body"):text("body of " .. id):up() end
	c:send(m)
end

local function messages(list)
	local n = 0
	for _, s in ipairs(list) do if s.name == "message" then n = n + 1 end end
	return n
end

local function login_and_count(srv, user)
	local c = assert(xmpp.connect { port = srv.c2s_port, user = user, password = PW, resource = "login" })
	c:presence()
	local n = messages(c:collect(0.8))
	c:close()
	return n
end

local ctl = offline.ctl

-- The live server's count for `jid`, through the shell's Lua form (`offline:count(...)`), which
-- both 0.12 and 13 run; the command-line form is test_live_shell_commands'.
local function live_count(srv, jid)
	return ctl(srv, "shell", ("offline:count(%q)"):format(jid))
end

-- Deletes `user`'s account without telling the running server, leaving its queue orphaned:
-- 0.12's `prosodyctl deluser` works on the files; 13's goes through the running server (whose
-- user-deleted handler removes the queue), so on 13 the account's file goes instead.
local function delete_behind_server(srv, user)
	if server.branch == "0.12" then
		ctl(srv, "deluser", user .. "@localhost")
	else
		assert(os.remove(srv.dir .. "/data/localhost/accounts/" .. user .. ".dat"))
	end
end

-- Makes every queued message of `user` look `days` days old.
local function age(srv, user, days)
	sql(srv, ("UPDATE message SET ts = ts - %d WHERE qid = (SELECT id FROM queue WHERE user = '%s')"):format(days * 86400 * 1000000, user))
end

---------------------------------------------------------------------------------------------------
TestMetrics = {}

function TestMetrics.teardownClass() if TestMetrics.srv then TestMetrics.srv:cleanup() end end

function TestMetrics:test_scrape_after_known_sequence()
	local srv = start { statistics = true, host = [[
access = { max_user_offline_messages = { { acl = "all", value = 3 } } }
]] }
	TestMetrics.srv = srv
	local a = online(srv, "alice") -- one login: one (empty) pop
	for i = 1, 4 do send(a, "bob@localhost", "m" .. i) end -- 3 stored, 1 over the limit
	send(a, "bob@localhost", "cs", function(m) m:tag("gone", { xmlns = "http://jabber.org/protocol/chatstates" }):up() end)
	send(a, "bob@localhost", "ns", function(m)
		m:tag("body"):text("x"):up():tag("no-store", { xmlns = "urn:xmpp:hints" }):up()
	end)
	a:ping()
	lu.assertEquals(login_and_count(srv, "bob"), 3) -- a second pop, 3 delivered

	local body, code = http.request(("http://127.0.0.1:%d/metrics"):format(srv.http_port))
	lu.assertEquals(code, 200)
	local function value(name, labels)
		local pattern = "\n" .. name:gsub("%p", "%%%0") .. "{" .. labels:gsub("%p", "%%%0") .. "} ([%d%.e%-]+)"
		return tonumber(body:match(pattern))
	end
	local h = 'host="localhost"'
	lu.assertEquals(value("prosody_mod_offline__stored_total", h), 3)
	lu.assertEquals(value("prosody_mod_offline__rejected_by_limit_total", h), 1)
	lu.assertEquals(value("prosody_mod_offline__delivered_total", h), 3)
	lu.assertEquals(value("prosody_mod_offline__dropped_by_policy_total", h .. ',reason="chatstate"'), 1)
	lu.assertEquals(value("prosody_mod_offline__dropped_by_policy_total", h .. ',reason="no-store"'), 1)
	lu.assertEquals(value("prosody_mod_offline__write_messages_seconds_count", h), 4, "every store call is timed")
	lu.assertEquals(value("prosody_mod_offline__pop_messages_seconds_count", h), 3,
		"each login's check of its queue, and bob's page")
	lu.assertEquals(value("prosody_mod_offline__write_messages_seconds_bucket", h .. ',le="+Inf"'), 4)
	local _, infs = body:gsub('prosody_mod_offline__write_messages_seconds_bucket{host="localhost",le="%+Inf"}', "")
	lu.assertEquals(infs, 1, "one +Inf bucket per histogram")
	lu.assertTrue(value("prosody_mod_offline__write_messages_seconds_sum", h) > 0)
	a:close()
end

---------------------------------------------------------------------------------------------------
TestAdmin = {}

function TestAdmin:setUp()
	self.srv = start { host = 'offline_expiry_sweep = false' }
	self.alice = online(self.srv, "alice")
end

function TestAdmin:tearDown()
	self.alice:close()
	self.srv:cleanup()
end

function TestAdmin:test_live_shell_commands()
	local srv, a = self.srv, self.alice
	for i = 1, 3 do send(a, "bob@localhost", "b" .. i) end
	send(a, "carol@localhost", "short", function(m)
		m:tag("body"):text("x"):up():tag("x", { xmlns = "jabber:x:expire", seconds = "1" }):up()
	end)
	send(a, "carol@localhost", "c1")
	a:ping()
	lu.assertStrContains(ctl(srv, "shell", "offline", "count", "bob@localhost"), "bob@localhost has 3 offline messages")
	local listing = ctl(srv, "shell", "offline", "list", "bob@localhost")
	local _, lines = listing:gsub("from alice@localhost/", "")
	lu.assertEquals(lines, 3)
	lu.assertStrContains(listing, "Listed 3 of 3 offline messages of bob@localhost")
	lu.assertStrContains(ctl(srv, "shell", "offline", "list", "bob@localhost", "2"), "Listed 2 of 3")

	socket.sleep(1.1)
	lu.assertStrContains(ctl(srv, "shell", "offline", "expire", "localhost"), "Removed 1 messages")
	lu.assertStrContains(ctl(srv, "shell", "offline", "count", "carol@localhost"), "has 1 offline messages")

	local ok, out = srv:prosodyctl("shell", "offline", "purge", "localhost", "0")
	lu.assertFalse(ok)
	lu.assertStrContains(out, "days must be a whole number >= 1 (got 0)")
	age(srv, "bob", 2)
	lu.assertStrContains(ctl(srv, "shell", "offline", "purge", "localhost", "3"), "Removed 0 messages")
	lu.assertStrContains(ctl(srv, "shell", "offline", "purge", "localhost", "1"), "Removed 3 messages")
	lu.assertStrContains(ctl(srv, "shell", "offline", "count", "bob@localhost"), "has 0 offline messages")
	lu.assertStrContains(ctl(srv, "shell", "offline", "delete", "carol@localhost"), "Removed 1 messages")
	lu.assertEquals(login_and_count(srv, "carol"), 0)

	ok, out = srv:prosodyctl("shell", "offline", "count", "nobody@elsewhere")
	lu.assertFalse(ok)
	lu.assertStrContains(out, "no such host: elsewhere")
	ok, out = srv:prosodyctl("shell", "offline", "count", "localhost")
	lu.assertFalse(ok)
	lu.assertStrContains(out, "expected a bare JID")
end

function TestAdmin:test_prosodyctl_mod_offline_next_to_running_server()
	local srv, a = self.srv, self.alice
	for i = 1, 4 do send(a, "bob@localhost", "p" .. i) end
	a:ping()
	lu.assertStrContains(ctl(srv, "mod_offline", "count", "bob@localhost"), "bob@localhost has 4 offline messages")
	lu.assertStrContains(ctl(srv, "mod_offline", "list", "bob@localhost", "3"), "Listed 3 of 4")
	age(srv, "bob", 5)
	local ok, out = srv:prosodyctl("mod_offline", "purge", "localhost", "-2")
	lu.assertFalse(ok)
	lu.assertStrContains(out, "days must be a whole number >= 1")
	lu.assertStrContains(ctl(srv, "mod_offline", "purge", "localhost", "4"), "Removed 4 messages")
	-- the server keeps working on the same file, with a right counter
	for i = 1, 2 do send(a, "bob@localhost", "q" .. i) end
	a:ping()
	lu.assertStrContains(live_count(srv, "bob@localhost"), "has 2 offline messages")
	lu.assertStrContains(ctl(srv, "mod_offline", "delete", "bob@localhost"), "Removed 2 messages")
	lu.assertEquals(login_and_count(srv, "bob"), 0)
	lu.assertStrContains(ctl(srv, "mod_offline", "expire", "localhost"), "Removed 0 messages")
	ok, out = srv:prosodyctl("mod_offline", "frobnicate")
	lu.assertFalse(ok)
	lu.assertStrContains(out, "Usage: prosodyctl mod_offline <command>")
end

-- The arguments of one command through a tool ({ "shell", "offline" } or { "mod_offline" }).
local function tool_args(tool, ...)
	return table.move({ ... }, 1, select("#", ...), #tool + 1, table.move(tool, 1, #tool, 1, {}))
end

-- JIDs as users type them: normalised (nodeprep, nameprep) in both tools; a malformed
-- JID or an unknown host is an error, never "Removed 0 messages".
function TestAdmin:test_jids_are_normalised()
	local srv, a = self.srv, self.alice
	for i = 1, 3 do send(a, "bob@localhost", "n" .. i) end
	send(a, "carol@localhost", "c1")
	a:ping()
	lu.assertStrContains(ctl(srv, "shell", "offline", "count", "Bob@LocalHost"), "bob@localhost has 3 offline messages")
	lu.assertStrContains(ctl(srv, "mod_offline", "count", "BOB@localhost"), "bob@localhost has 3 offline messages")
	lu.assertStrContains(ctl(srv, "shell", "offline", "list", "bob@LOCALHOST", "1"), "Listed 1 of 3")
	lu.assertStrContains(ctl(srv, "shell", "offline", "expire", "LocalHost"), "Removed 0 messages")
	lu.assertStrContains(ctl(srv, "mod_offline", "expire", "LOCALHOST"), "Removed 0 messages")
	for _, tool in ipairs { { "shell", "offline" }, { "mod_offline" } } do
		for jid, why in pairs { ["bob@"] = "not a valid JID: bob@", ["a@b@localhost"] = "not a valid JID",
			["bob@elsewhere"] = "no such host: elsewhere", ["bob@localhost/phone"] = "expected a bare JID" } do
			local ok, out = srv:prosodyctl(table.unpack(tool_args(tool, "delete", jid)))
			lu.assertFalse(ok, jid)
			lu.assertStrContains(out, why)
			lu.assertNotStrContains(out, "Removed")
		end
	end
	lu.assertStrContains(ctl(srv, "shell", "offline", "delete", "Bob@localhost"), "Removed 3 messages")
	lu.assertStrContains(ctl(srv, "mod_offline", "delete", "CAROL@Localhost"), "Removed 1 messages")
	lu.assertEquals(login_and_count(srv, "bob"), 0)
	lu.assertEquals(login_and_count(srv, "carol"), 0)
end

-- A max that is not a whole number >= 1 is an error, not the default of 50.
function TestAdmin:test_list_max_is_checked()
	local srv, a = self.srv, self.alice
	send(a, "bob@localhost", "l1")
	a:ping()
	for _, tool in ipairs { { "shell", "offline" }, { "mod_offline" } } do
		for _, max in ipairs { "abc", "0", "-3", "1.5" } do
			local ok, out = srv:prosodyctl(table.unpack(tool_args(tool, "list", "bob@localhost", max)))
			lu.assertFalse(ok, max)
			lu.assertStrContains(out, ("max must be a whole number >= 1 (got %s)"):format(max))
			lu.assertNotStrContains(out, "Listed")
		end
	end
	lu.assertStrContains(ctl(srv, "mod_offline", "list", "bob@localhost"), "Listed 1 of 1")
end

-- The shell has help for the offline commands: `help offline`, a line in `help`,
-- and `offline:help()`. 0.12 shows our own list; 13 shows the registered commands
-- in its command-line form, each with its arguments and description.
function TestAdmin:test_shell_help()
	local srv = self.srv
	local help = ctl(srv, "shell", "help offline")
	for _, c in ipairs { { "count", "jid" }, { "list", "jid, max" }, { "delete", "jid" }, { "expire", "host" },
		{ "purge", "host, days" }, { "orphans", "host" } } do
		if server.branch == "0.12" then
			lu.assertStrContains(help, ("offline:%s(%s) - "):format(c[1], c[2]))
		else
			lu.assertStrContains(help, ("offline %s <%s>\n    "):format(c[1], (c[2]:gsub(", ", "> <"))))
		end
	end
	if server.branch ~= "0.12" then
		lu.assertStrContains(help, "Help: offline\nOffline messages: count, list and delete queues (mod_offline)")
		lu.assertStrContains(help, "offline purge <host> <days>\n    Delete messages older than days (>= 1)")
	end
	local sections = ctl(srv, "shell", "help")
	lu.assertStrMatches(sections, ".*\nc2s .*\noffline%s+|%s+Offline messages: count, list and delete queues.*")
	lu.assertEquals(select(2, sections:gsub("\noffline%s+|", "")), 1, "one offline section")
	lu.assertStrContains(ctl(srv, "shell", "offline", "help"), "offline:purge(host, days) - Delete messages older than days")
end

-- An account deleted without telling the running server (0.12's `prosodyctl deluser`) leaves its
-- queue: it is removed by `prosodyctl mod_offline orphans`. 13's deluser tells the server.
function TestAdmin:test_orphans_of_deluser()
	local srv, a = self.srv, self.alice
	send(a, "dave@localhost", "d1")
	send(a, "dave@localhost", "d2")
	send(a, "bob@localhost", "kept")
	a:ping()
	if server.branch ~= "0.12" then
		local carol = "SELECT count(*) FROM message JOIN queue ON queue.id = qid WHERE user = 'carol'"
		send(a, "carol@localhost", "c1")
		a:ping()
		lu.assertEquals(sql(srv, carol), "1\n")
		ctl(srv, "deluser", "carol@localhost")
		lu.assertEquals(sql(srv, carol), "0\n", "13's deluser removed the queue")
	end
	delete_behind_server(srv, "dave")
	lu.assertEquals(sql(srv, "SELECT count(*) FROM message JOIN queue ON queue.id = qid WHERE user = 'dave'"), "2\n", "deluser left the queue")
	lu.assertStrContains(ctl(srv, "mod_offline", "orphans", "localhost"), "Removed 2 messages")
	lu.assertEquals(sql(srv, "SELECT count(*) FROM message JOIN queue ON queue.id = qid WHERE user = 'dave'"), "0\n")
	lu.assertStrContains(live_count(srv, "bob@localhost"), "has 1 offline messages")
end

---------------------------------------------------------------------------------------------------
-- The sweep runs from mod_cron. To run it now rather than tomorrow, the spec stops the server
-- and tells mod_cron (through its own store) that the task last ran long ago.
TestSweep = {}

function TestSweep:tearDown() if self.srv then self.srv:cleanup() end end

function TestSweep:test_cron_sweep_removes_expired_and_orphans()
	local srv = start { host = 'offline_expiry_sweep = "daily"' }
	self.srv = srv
	lu.assertStrContains(srv:log(), "daily task offline/expiry_sweep added")
	local a = online(srv, "alice")
	send(a, "carol@localhost", "exp", function(m)
		m:tag("body"):text("x"):up():tag("x", { xmlns = "jabber:x:expire", seconds = "1" }):up()
	end)
	send(a, "carol@localhost", "keep")
	send(a, "dave@localhost", "orphan1")
	send(a, "dave@localhost", "orphan2")
	a:ping()
	a:close()
	delete_behind_server(srv, "dave")
	srv:stop()
	support.write(srv.dir .. "/data/localhost/cron.dat", 'return { ["offline/expiry_sweep"] = 0; };\n')
	socket.sleep(1.1)
	srv:restart()
	local deadline = socket.gettime() + 8
	while not srv:log():find("Orphaned queues", 1, true) and socket.gettime() < deadline do socket.sleep(0.2) end
	local log = srv:log()
	lu.assertStrContains(log, "Expiry sweep: Removed 1 messages")
	lu.assertStrContains(log, "Orphaned queues: Removed 2 messages from 1 deleted accounts")
	lu.assertEquals(sql(srv, "SELECT user, count(*) FROM message JOIN queue ON queue.id = qid GROUP BY user"), "carol|1\n")
	lu.assertEquals(sql(srv, "SELECT user, count, bytes > 0 FROM queue"), "carol|1|1\n", "counters follow")
end

function TestSweep:test_sweep_can_be_turned_off()
	local srv = start { host = "offline_expiry_sweep = false" }
	self.srv = srv
	lu.assertNil(srv:log():find("task offline/expiry_sweep added", 1, true))
end

---------------------------------------------------------------------------------------------------
-- What the operator reads in the log: one info line at load, warnings for misspelt options and
-- rules that do not exist, rejections at warn (rate-limited); and the shell when the module did
-- not load.
TestOperatorLog = {}

function TestOperatorLog:tearDown() if self.srv then self.srv:cleanup() end end

-- The log lines of one level that contain `text`.
local function log_lines(srv, level, text)
	local out = {}
	for line in srv:log():gmatch("[^\n]+") do
		if line:find("%s" .. level .. "%s") and line:find(text, 1, true) then out[#out + 1] = line end
	end
	return out
end

function TestOperatorLog:test_load_says_what_runs_and_warns_about_misspellings()
	local srv = start { global = 'offline_expiry_sweeps = "daily"', host = [[
offline_store_groupchat_message = true
offline_access_max_user_messages = "my_limits"
offline_expiry_sweep = false
]] }
	self.srv = srv
	lu.assertEquals(#log_lines(srv, "warn", "unknown option offline_store_groupchat_message is ignored"
		.. " (did you mean offline_store_groupchat_messages?)"), 1)
	lu.assertEquals(#log_lines(srv, "warn", "unknown option offline_expiry_sweeps is ignored (did you mean offline_expiry_sweep?)"), 1)
	lu.assertEquals(#log_lines(srv, "warn", 'offline_access_max_user_messages names the rule "my_limits", which the access option'
		.. " does not define; the built-in default applies"), 1)
	lu.assertEquals(#log_lines(srv, "info", "Offline messages (this mod_offline, not the bundled one): sqlite file "
		.. srv.dir .. "/data/offline.sqlite; limits rule my_limits: admin 5000, all 100 (built-in default); expiry sweep off"), 1)
end

function TestOperatorLog:test_defined_rule_and_memory_backend_are_said()
	local srv = start { host = [[
offline_backend = "memory"
access = { max_user_offline_messages = { { acl = "all", value = 1 } } }
]] }
	self.srv = srv
	lu.assertEquals(#log_lines(srv, "info", ": memory (inside the server process, lost at restart); limits rule"
		.. " max_user_offline_messages: all 1; expiry sweep daily"), 1)
	lu.assertEquals(#log_lines(srv, "warn", "unknown option"), 0)
	lu.assertEquals(#log_lines(srv, "warn", "does not define"), 0, "no warning for the default rule name")
	-- rejections: at warn, one line for a burst
	local a = online(srv, "alice")
	for i = 1, 4 do send(a, "bob@localhost", "r" .. i) end
	a:ping()
	a:close()
	lu.assertEquals(#log_lines(srv, "warn", "Offline queue of bob@localhost is full (1 messages); a message was rejected"), 1)
	lu.assertEquals(login_and_count(srv, "bob"), 1)
end

function TestOperatorLog:test_shell_says_why_the_module_is_not_loaded()
	local srv = start { host = 'offline_store_groupchat_messages = "yes"' }
	self.srv = srv
	local ok, out = srv:prosodyctl("shell", "offline", "count", "bob@localhost")
	lu.assertFalse(ok)
	lu.assertStrContains(out, 'mod_offline is not loaded on localhost: offline_store_groupchat_messages must be true or false (got "yes")')
	lu.assertNotStrContains(out, "attempt to index")
end

---------------------------------------------------------------------------------------------------
-- A config reload applies `access` and `acl` at once; a bad new value is logged, naming it, and
-- the running limit stays.
TestReload = {}

function TestReload:tearDown() if self.srv then self.srv:cleanup() end end

function TestReload:test_reload_applies_rules_and_keeps_them_on_a_bad_value()
	local srv = start { host = [[
access = { max_user_offline_messages = { { acl = "all", value = 2 } } }
]] }
	self.srv = srv
	local a = online(srv, "alice")
	for i = 1, 3 do send(a, "bob@localhost", "a" .. i) end
	a:ping()
	lu.assertStrContains(ctl(srv, "shell", "offline", "count", "bob@localhost"), "has 2 offline messages")

	local config = support.read(srv.config)
	local function reload(text)
		support.write(srv.config, text)
		ctl(srv, "shell", "config", "reload")
	end
	reload(config:gsub("value = 2", "value = 3") .. 'offline_sqlite_synchronous = "full"\n')
	send(a, "bob@localhost", "b1")
	send(a, "bob@localhost", "b2")
	a:ping()
	lu.assertStrContains(ctl(srv, "shell", "offline", "count", "bob@localhost"), "has 3 offline messages", "the new limit applies")
	lu.assertStrContains(srv:log(), "Config reload: offline_sqlite_synchronous changed; the store keeps running as it is")
	lu.assertStrContains(srv:log(), "Config reloaded: sqlite file")

	reload(config:gsub("value = 2", 'value = "lots"'))
	lu.assertStrContains(srv:log(), 'Config reload: access.max_user_offline_messages[1].value must be a whole number >= 0 or "infinity"'
		.. ' (got "lots"); mod_offline on localhost keeps its running settings')
	reload(config:gsub("value = 2", "value = 5"):gsub('offline_', 'offline_') .. "offline_store_groupchat_messages = 1\n")
	lu.assertStrContains(srv:log(), "Config reload: offline_store_groupchat_messages must be true or false (got 1)")
	send(a, "bob@localhost", "c1")
	a:ping()
	lu.assertStrContains(ctl(srv, "shell", "offline", "count", "bob@localhost"), "has 3 offline messages", "the running limit stays")
	a:close()
end

---------------------------------------------------------------------------------------------------
-- `prosody -D` loads its modules, then forks into the background: the daemon does not inherit
-- the POSIX locks sqlite took in the process that opened the file. Another connection that then
-- opens and closes the file (prosodyctl mod_offline, the sqlite3 shell) would take itself for the
-- last one, checkpoint and delete the WAL under the daemon, whose later commits would vanish at
-- the next restart. Every message stored around such a command must survive a restart.
TestDaemonAndTools = {}

function TestDaemonAndTools.teardownClass() if TestDaemonAndTools.srv then TestDaemonAndTools.srv:cleanup() end end

function TestDaemonAndTools:test_commands_next_to_the_daemon_lose_nothing()
	local srv = start {}
	TestDaemonAndTools.srv = srv
	local alice = online(srv, "alice")
	local function send_some(from, to)
		for i = from, to do send(alice, "bob@localhost", "d" .. i) end
		alice:ping()
	end
	send_some(1, 3)
	lu.assertStrContains(ctl(srv, "mod_offline", "count", "bob@localhost"), "has 3 offline messages")
	send_some(4, 6)
	lu.assertStrContains(sql(srv, "SELECT count(*) FROM message"), "6")
	send_some(7, 9)
	lu.assertStrContains(ctl(srv, "mod_offline", "count", "bob@localhost"), "has 9 offline messages")
	send_some(10, 12)
	alice:close()
	srv:restart()
	lu.assertEquals(login_and_count(srv, "bob"), 12, "every message stored around the commands survives a restart")
end
