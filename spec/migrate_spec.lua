-- Drop-in in both directions, through the real Prosody: what Prosody's own mod_offline queued
-- (internal storage, and SQL storage through mod_storage_sql on sqlite) is imported when this
-- module first loads, in order, with its original stamps, once, and a SIGKILL in the middle of
-- the import neither loses nor duplicates; `prosodyctl mod_offline export` and the shell's
-- `offline export` / `offline import` give the queues back to Prosody's own module.

local lu = require "luaunit"
local offline = require "support.offline"
local support = require "support.util"
local datetime = require "util.datetime"
local socket = require "socket"

local online, chat, ids, delays, collect_offline, ctl =
	offline.online, offline.chat, offline.ids, offline.delays, offline.collect_offline, offline.ctl

local SQL = 'storage = "sql"\nsql = { driver = "SQLite3", database = "prosody.sqlite" }'
local FAULTS = offline.ROOT .. "/spec/support/plugins"
-- Times put into the bundled store in place of the real ones: old, so a stamp taken at the
-- import (or at delivery) instead of from the bundled store shows.
local OLD = 1600000000

-- The options of a server on `storage` ("internal" or "sql"): with Prosody's own mod_offline
-- (bundled), or ours; `extra` adds options.
local function options(storage, bundled, extra)
	local o = { bundled = bundled, global = storage == "sql" and SQL or "" }
	for k, v in pairs(extra or {}) do o[k] = v end
	o.plugin_paths = offline.plugin_paths(o)
	return o
end

local function log_since(srv, from) return srv:log():sub(from + 1) end

-- The log since offset `from` once it holds `text` (the import runs just after the start), or
-- after `seconds`.
local function wait_log(srv, from, text, seconds)
	local deadline = socket.gettime() + (seconds or 5)
	repeat
		local log = log_since(srv, from)
		if log:find(text, 1, true) then return log end
		socket.sleep(0.05)
	until socket.gettime() > deadline
	return log_since(srv, from)
end

-- alice sends `n` messages (ids PREFIX1..PREFIXn) to each user in `to`, all offline.
local function queue(srv, to, n, prefix)
	local a = online(srv, "alice")
	for _, user in ipairs(to) do
		for i = 1, n do a:send(chat(user .. "@localhost", prefix .. i, "body " .. i)) end
	end
	a:ping()
	a:close()
end

local function sqlite(file, query)
	local ok, out = support.sh("sqlite3 " .. support.quote(file) .. " " .. support.quote(query))
	assert(ok, out)
	return (out:gsub("%s+$", ""))
end

-- How many messages `user` has in Prosody's own offline store.
local function bundled_count(srv, storage, user)
	if storage == "sql" then
		return tonumber(sqlite(srv.dir .. "/data/prosody.sqlite",
			("SELECT COUNT(*) FROM prosodyarchive WHERE store = 'offline' AND user = '%s'"):format(user)))
	end
	local list = support.read(srv.dir .. "/data/localhost/offline/" .. user .. ".list") or ""
	return select(2, list:gsub("\nitem%(", "")) + (list:find("^item%(") and 1 or 0)
end

-- How many messages `user` has in our store (the default sqlite file).
local function ours_count(srv, user)
	local f = srv.dir .. "/data/offline.sqlite"
	if not support.read(f) then return 0 end
	return tonumber(sqlite(f, ("SELECT COUNT(*) FROM message WHERE qid IN (SELECT id FROM queue WHERE user = '%s')")
		:format(user)))
end

-- Makes the bundled store's times of `user`'s messages OLD, OLD + 100, ... in their order.
-- (The internal file is rewritten in place with numbers of the same length: Prosody 13
-- keeps an index of its offsets.)
local function age_bundled(srv, storage, user)
	if storage == "sql" then
		sqlite(srv.dir .. "/data/prosody.sqlite", ([[UPDATE prosodyarchive SET "when" = %d + 100 *
			(sort_id - (SELECT MIN(sort_id) FROM prosodyarchive WHERE store = 'offline' AND user = '%s'))
			WHERE store = 'offline' AND user = '%s']]):format(OLD, user, user))
		return
	end
	local path = srv.dir .. "/data/localhost/offline/" .. user .. ".list"
	local i = -1
	local text, n = assert(support.read(path)):gsub('%["when"%] = %d+;', function()
		i = i + 1
		return ('["when"] = %d;'):format(OLD + 100 * i)
	end)
	assert(n > 0, "no times in " .. path)
	support.write(path, text)
end

-- The stamp of the one XEP-0203 delay of `m`.
local function stamp(m)
	local d = delays(m)
	lu.assertEquals(#d, 1, "one delay: " .. tostring(m))
	return d[1].attr.stamp
end

local function wait_dead(srv, seconds)
	local deadline = socket.gettime() + seconds
	while srv:running() and socket.gettime() < deadline do socket.sleep(0.05) end
	return not srv:running()
end

---------------------------------------------------------------------------------------------------
TestMigrate = {}

function TestMigrate:tearDown()
	if self.srv then self.srv:cleanup(); self.srv = nil end
end

-- Prosody's own module queues three messages for bob; after the switch bob receives them once,
-- in order, with the bundled store's stamps; a second start imports nothing and delivers nothing
-- again, and neither does a third after bob's login.
local function import_once(self, storage)
	self.srv = offline.start(options(storage, true))
	local srv = self.srv
	queue(srv, { "bob" }, 3, "b")
	srv:stop()
	lu.assertEquals(bundled_count(srv, storage, "bob"), 3, "the bundled module queued them")
	age_bundled(srv, storage, "bob")

	local from = #srv:log()
	srv:reconfigure(options(storage, false))
	srv:restart()
	lu.assertStrContains(wait_log(srv, from, "Imported"), "Imported 3 offline messages of 1 users from Prosody's own offline store")
	lu.assertEquals(bundled_count(srv, storage, "bob"), 0, "moved out of the bundled store")
	lu.assertEquals(ours_count(srv, "bob"), 3)

	from = #srv:log()
	srv:restart() -- a second start: nothing left to import
	lu.assertStrContains(wait_log(srv, from, "Imported 0 offline messages of 0 users"), "Imported 0 offline messages of 0 users")
	lu.assertEquals(ours_count(srv, "bob"), 3, "nothing imported twice")

	local got = collect_offline(srv, "bob", 3, nil, 3)
	lu.assertEquals(ids(got), { "b1", "b2", "b3" })
	for i, m in ipairs(got) do lu.assertEquals(stamp(m), datetime.datetime(OLD + 100 * (i - 1))) end

	srv:restart()
	lu.assertEquals(#collect_offline(srv, "bob", 0.8), 0, "not delivered again")
end

function TestMigrate:test_import_from_internal_storage_once_in_order_with_stamps() import_once(self, "internal") end
function TestMigrate:test_import_from_sql_storage_once_in_order_with_stamps() import_once(self, "sql") end

-- Ours queues two messages for bob; the server stops; `prosodyctl mod_offline export` moves them
-- to Prosody's own store; without our plugin, Prosody's own module delivers them with our stamps.
local function export_back(self, storage)
	self.srv = offline.start(options(storage, false))
	local srv = self.srv
	queue(srv, { "bob" }, 2, "e")
	srv:stop()
	local ts = sqlite(srv.dir .. "/data/offline.sqlite", "SELECT ts FROM message ORDER BY id")
	local stamps = {}
	for t in ts:gmatch("%d+") do stamps[#stamps + 1] = datetime.datetime(tonumber(t) // 1000000) end
	lu.assertEquals(#stamps, 2)

	local out = ctl(srv, "mod_offline", "export", "localhost")
	lu.assertStrContains(out, "Exported 2 offline messages of 1 users to Prosody's own offline store")
	lu.assertEquals(ours_count(srv, "bob"), 0)
	lu.assertEquals(bundled_count(srv, storage, "bob"), 2)

	local from = #srv:log()
	srv:reconfigure(options(storage, true))
	srv:restart()
	lu.assertNotStrContains(log_since(srv, from), "this mod_offline, not the bundled one")
	local got = collect_offline(srv, "bob", 3, nil, 2)
	lu.assertEquals(ids(got), { "e1", "e2" })
	for i, m in ipairs(got) do lu.assertEquals(stamp(m), stamps[i]) end
	lu.assertEquals(#collect_offline(srv, "bob", 0.8), 0, "delivered once")
end

function TestMigrate:test_export_to_internal_storage_for_the_bundled_module() export_back(self, "internal") end
function TestMigrate:test_export_to_sql_storage_for_the_bundled_module() export_back(self, "sql") end

-- The live shell's commands, as `prosodyctl shell offline export|import HOST` runs them.
function TestMigrate:test_shell_export_then_import()
	self.srv = offline.start(options("internal", false))
	local srv = self.srv
	queue(srv, { "bob" }, 2, "s")
	lu.assertStrContains(ctl(srv, "shell", "offline", "export", "localhost"),
		"Exported 2 offline messages of 1 users to Prosody's own offline store")
	lu.assertEquals(bundled_count(srv, "internal", "bob"), 2)
	lu.assertEquals(ours_count(srv, "bob"), 0)
	lu.assertStrContains(ctl(srv, "shell", "offline", "import", "localhost"),
		"Imported 2 offline messages of 1 users from Prosody's own offline store")
	lu.assertEquals(bundled_count(srv, "internal", "bob"), 0)
	local got = collect_offline(srv, "bob", 3, nil, 2)
	lu.assertEquals(ids(got), { "s1", "s2" })
	lu.assertEquals(#collect_offline(srv, "bob", 0.8), 0, "delivered once")
end

-- SIGKILL between the commit of a user's imported messages and their delete from the bundled
-- store (the second user's): after a restart every user receives each message exactly once.
local function import_killed(self, storage)
	local users = { "bob", "carol", "dave" }
	self.srv = offline.start(options(storage, true))
	local srv = self.srv
	queue(srv, users, 2, "k")
	srv:stop()

	local from = #srv:log()
	srv:reconfigure(options(storage, false, { plugin_paths = { FAULTS }, modules_enabled = { "kill_at_bundled_delete" },
		host = "kill_at_bundled_delete = 2" }))
	pcall(srv.restart, srv) -- (it may die before it looks started)
	lu.assertTrue(wait_dead(srv, 10), "killed during the import")
	local victim = log_since(srv, from):match("fault: SIGKILL before deleting the bundled queue of (%a+)")
	lu.assertNotNil(victim, "killed at the second delete")
	lu.assertEquals(ours_count(srv, victim), 2, "the killed user's messages were committed here")
	lu.assertEquals(bundled_count(srv, storage, victim), 2, "and were still in the bundled store")

	from = #srv:log()
	srv:reconfigure(options(storage, false))
	srv:restart()
	lu.assertStrContains(wait_log(srv, from, "Imported"),
		"Imported 2 offline messages of 1 users from Prosody's own offline store; 2 more were here already")
	for _, user in ipairs(users) do
		lu.assertEquals(bundled_count(srv, storage, user), 0, user)
		lu.assertEquals(ours_count(srv, user), 2, user)
		local got = collect_offline(srv, user, 3, nil, 2)
		lu.assertEquals(ids(got), { "k1", "k2" }, user)
		lu.assertEquals(#collect_offline(srv, user, 0.5), 0, user .. ": once")
	end
end

function TestMigrate:test_import_killed_midway_internal_storage() import_killed(self, "internal") end
function TestMigrate:test_import_killed_midway_sql_storage() import_killed(self, "sql") end

-- `prosodyctl mod_offline import HOST` with the server stopped: what Prosody's own module
-- queued is here afterwards, in order, once; the start that follows finds nothing more.
function TestMigrate:test_prosodyctl_import()
	self.srv = offline.start(options("internal", true))
	local srv = self.srv
	queue(srv, { "bob", "carol" }, 2, "p")
	srv:stop()
	srv:reconfigure(options("internal", false))
	lu.assertStrContains(ctl(srv, "mod_offline", "import", "localhost"),
		"Imported 4 offline messages of 2 users from Prosody's own offline store")
	for _, user in ipairs { "bob", "carol" } do
		lu.assertEquals(bundled_count(srv, "internal", user), 0, user)
		lu.assertEquals(ours_count(srv, user), 2, user)
	end
	local from = #srv:log()
	srv:restart()
	lu.assertStrContains(wait_log(srv, from, "Imported 0 offline messages"), "Imported 0 offline messages of 0 users")
	local got = collect_offline(srv, "bob", 3, nil, 2)
	lu.assertEquals(ids(got), { "p1", "p2" })
	lu.assertEquals(#collect_offline(srv, "bob", 0.8), 0, "delivered once")
end

-- SIGKILL in the middle of the shell's export, after the third message went into Prosody's
-- own store (the second user's first) and before anything was removed here for that user:
-- the export run again after the restart leaves every message in Prosody's own store
-- exactly once and none here.
local function export_killed(self, storage)
	local users = { "bob", "carol", "dave" }
	self.srv = offline.start(options(storage, false, { plugin_paths = { FAULTS },
		modules_enabled = { "kill_at_bundled_delete" }, host = "kill_at_bundled_append = 3" }))
	local srv = self.srv
	queue(srv, users, 2, "x")
	pcall(ctl, srv, "shell", "offline", "export", "localhost") -- (the server dies under it)
	lu.assertTrue(wait_dead(srv, 10), "killed during the export")
	local victim = srv:log():match("fault: SIGKILL after append 3 to the bundled queue of (%a+)")
	lu.assertNotNil(victim, "killed at the third append")
	lu.assertEquals(bundled_count(srv, storage, victim), 1, "one of its messages went")
	lu.assertEquals(ours_count(srv, victim), 2, "and both are still here")

	srv:reconfigure(options(storage, false))
	srv:restart()
	lu.assertStrContains(ctl(srv, "shell", "offline", "export", "localhost"), "Exported")
	for _, user in ipairs(users) do
		lu.assertEquals(ours_count(srv, user), 0, user)
		lu.assertEquals(bundled_count(srv, storage, user), 2, user .. ": each message once")
	end
	srv:stop()
	srv:reconfigure(options(storage, true))
	srv:restart()
	for _, user in ipairs(users) do
		lu.assertEquals(ids(collect_offline(srv, user, 3, nil, 2)), { "x1", "x2" }, user)
	end
end

function TestMigrate:test_export_killed_midway_internal_storage() export_killed(self, "internal") end
function TestMigrate:test_export_killed_midway_sql_storage() export_killed(self, "sql") end
