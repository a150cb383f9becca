-- Reliability and hostile input through the real server: SIGKILL mid-storm, a full and a
-- read-only filesystem under the running server, bad files at start, odd and oversized
-- content, one very long queue, 100,000 recipients, and a concurrent load. Nothing that
-- was acknowledged may be lost, nothing may arrive twice, and nobody gets another's mail.

local lu = require "luaunit"
local offline = require "support.offline"
local support = require "support.util"
local core = require "offline_store.core"
local socket = require "socket"

local start, online, chat, ids, messages = offline.start, offline.online, offline.chat, offline.ids, offline.messages
local PW = offline.PW
local UNLIMITED = 'access = { max_user_offline_messages = { { acl = "all", value = "infinity" } } }'
local NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

-- Writes account files directly (Prosody 0.12 internal_plain), for many users at once.
local function make_accounts(srv, names)
	local dir = srv.dir .. "/data/localhost/accounts"
	assert(support.exec("mkdir -p " .. support.quote(dir)))
	for _, name in ipairs(names) do
		support.write(dir .. "/" .. name .. ".dat", ('return {\n\t["password"] = %q;\n};\n'):format(PW))
	end
end

-- Server CPU seconds (utime + stime) from /proc.
local function cpu_seconds(pid)
	local stat = support.read("/proc/" .. pid .. "/stat") or ""
	local fields = {}
	for f in stat:gsub("^.*%) ", ""):gmatch("%S+") do fields[#fields + 1] = f end
	return ((tonumber(fields[12]) or 0) + (tonumber(fields[13]) or 0)) / 100
end

-- Logs many users in at once (up to `width` sessions), each expecting `want[user]`
-- messages; returns user -> list of received message stanzas.
local function drain_all(srv, users, want, width)
	local got, queue = {}, {}
	for i, u in ipairs(users) do queue[i] = u end
	local active = {}
	local deadline = socket.gettime() + 300
	while (#queue > 0 or next(active)) and socket.gettime() < deadline do
		while #queue > 0 and #active < width do
			local u = table.remove(queue, 1)
			local c = offline.login(srv, u, "drain")
			c:presence()
			got[u] = {}
			active[#active + 1] = { user = u, c = c, idle = 0 }
		end
		for i = #active, 1, -1 do
			local a = active[i]
			local before = #got[a.user]
			for _, s in ipairs(messages(a.c:collect(0.02))) do table.insert(got[a.user], s) end
			a.idle = (#got[a.user] == before) and a.idle + 1 or 0
			if #got[a.user] >= (want[a.user] or 0) and a.idle >= 2 or a.idle > 150 then
				a.c:close(0.2)
				table.remove(active, i)
			end
		end
	end
	return got
end

-- Checks deliveries against what was sent: every id in `must` arrived once, every
-- arrival was sent to that user, none twice, and per-sender order is kept.
local function check_deliveries(got, sent_to, must)
	local seen, lost, dup, foreign, disorder = {}, 0, 0, 0, 0
	for user, list in pairs(got) do
		local last_seq = {}
		for _, s in ipairs(list) do
			local id = s.attr.id
			if seen[id] then dup = dup + 1 end
			seen[id] = true
			if sent_to[id] ~= user then foreign = foreign + 1 end
			local sender, seq = id:match("^(.-)%-(%d+)$")
			seq = tonumber(seq)
			if sender and seq then
				if last_seq[sender] and seq <= last_seq[sender] then disorder = disorder + 1 end
				last_seq[sender] = seq
			end
		end
	end
	for id in pairs(must) do
		if not seen[id] then lost = lost + 1 end
	end
	return { lost = lost, duplicated = dup, foreign = foreign, out_of_order = disorder }
end

---------------------------------------------------------------------------------------------------
-- SIGKILL in the middle of a storm: every acknowledged message survives, none twice.
TestKill = {}

local RECIPIENTS = { "bob", "carol", "dave" }

local function storm(srv, seconds)
	local senders = {}
	for i = 1, 3 do senders[i] = online(srv, "alice", "storm" .. i) end
	local sent_to, acked, seq = {}, {}, 0
	local started = socket.gettime()
	while true do
		local batches = {}
		for si, c in ipairs(senders) do
			batches[si] = {}
			for _ = 1, 25 do
				seq = seq + 1
				local id = ("s%d-%d"):format(si, seq)
				local to = RECIPIENTS[seq % #RECIPIENTS + 1]
				sent_to[id] = to
				c:send(chat(to .. "@localhost", id, "storm " .. id))
				table.insert(batches[si], id)
			end
		end
		if socket.gettime() - started > seconds then
			srv:kill() -- with a batch in flight on every sender
			break
		end
		for si, c in ipairs(senders) do
			c:ping(5)
			for _, id in ipairs(batches[si]) do acked[id] = true end
		end
	end
	for _, c in ipairs(senders) do c:drop() end
	return sent_to, acked
end

local function kill_and_check(sync, seconds)
	local srv = start { host = UNLIMITED .. (sync and ('\noffline_sqlite_synchronous = %q'):format(sync) or "") }
	local ok, err = pcall(function()
		local sent_to, acked = storm(srv, seconds)
		srv:restart()
		local want = {}
		for id in pairs(acked) do want[sent_to[id]] = (want[sent_to[id]] or 0) + 1 end
		local got = drain_all(srv, RECIPIENTS, want, 3)
		local n_acked = 0
		for _ in pairs(acked) do n_acked = n_acked + 1 end
		lu.assertTrue(n_acked > 0, "the storm acknowledged something before the kill")
		lu.assertEquals(check_deliveries(got, sent_to, acked), { lost = 0, duplicated = 0, foreign = 0, out_of_order = 0 })
		-- and nothing is left behind to arrive a second time
		for _, u in ipairs(RECIPIENTS) do lu.assertEquals(#offline.collect_offline(srv, u, 0.3), 0) end
	end)
	srv:cleanup()
	if not ok then error(err, 0) end
end

function TestKill:test_kill_points_default_durability()
	for _, seconds in ipairs({ 0.2, 0.6, 1.1 }) do kill_and_check(nil, seconds) end
end

function TestKill:test_kill_with_synchronous_full()
	kill_and_check("full", 0.5)
end

---------------------------------------------------------------------------------------------------
-- The sqlite file's filesystem fills up, or turns read-only, under the running server.
TestFilesystem = {}

function TestFilesystem:setUp()
	self.dir = support.tmpdir()
	self.mnt = self.dir .. "/mnt"
	assert(support.exec("mkdir -p " .. support.quote(self.mnt)))
	local ok, out = support.sh("mount -t tmpfs -o size=1m tmpfs " .. support.quote(self.mnt))
	assert(ok, "these specs need to mount a small tmpfs (run as root): " .. out)
	self.file = self.mnt .. "/offline.sqlite"
end

function TestFilesystem:tearDown()
	if self.srv then self.srv:cleanup() end
	support.exec("umount " .. support.quote(self.mnt))
	support.rmrf(self.dir)
end

local function remount(mnt, opts)
	local ok, out = support.sh("mount -o remount," .. opts .. " " .. support.quote(mnt))
	assert(ok, out)
end

-- Sends one message and returns "stored" or the error condition it got back.
local function offer(a, id, body)
	a:send(chat("bob@localhost", id, body))
	local back = messages(a:ping())
	if #back == 0 then return "stored" end
	lu.assertEquals(#back, 1)
	lu.assertEquals(back[1].attr.id, id)
	lu.assertEquals(back[1].attr.type, "error")
	return offline.error_of(back[1]).condition, back[1]
end

-- The live server's count, through the shell's Lua form, which 0.12 and 13 both run.
local function shell_count(srv, jid)
	local ok, out = srv:prosodyctl("shell", ("offline:count(%q)"):format(jid))
	assert(ok, out)
	return tonumber(out:match("has (%d+) offline messages"))
end

function TestFilesystem:test_disk_full_then_space_back()
	self.srv = start { host = UNLIMITED .. ("\noffline_sqlite_file = %q"):format(self.file) }
	local a = online(self.srv, "alice")
	local stored, failed, body = {}, 0, ("x"):rep(6000)
	for i = 1, 200 do
		local result, reply = offer(a, "f" .. i, body)
		if result == "stored" then
			stored[#stored + 1] = "f" .. i
		else
			lu.assertEquals(result, "internal-server-error")
			lu.assertEquals(reply:get_child("error").attr.type, "wait")
			lu.assertStrContains(reply:get_child("error"):get_child_text("text", NS_STANZAS), "not stored")
			failed = failed + 1
			if failed >= 3 then break end
		end
	end
	lu.assertEquals(failed, 3, "the filesystem filled up")
	lu.assertTrue(#stored > 5, #stored .. " stored before it was full")
	lu.assertEquals(shell_count(self.srv, "bob@localhost"), #stored, "the counter is exact")
	-- (logged by the store, or by the commit of the batch it was in)
	lu.assertStrContains(self.srv:log(), "failed: database or disk is full")
	remount(self.mnt, "size=16m")
	for i = 1, 3 do
		lu.assertEquals(offer(a, "after" .. i, body), "stored", "storing works again without a restart")
		stored[#stored + 1] = "after" .. i
	end
	lu.assertEquals(ids(offline.collect_offline(self.srv, "bob", 5, nil, #stored)), stored)
	a:close()
end

-- A filesystem cannot be remounted read-only while sqlite holds the file open for
-- writing, so the server runs with build/fault.so preloaded, which fails every write
-- under the mount with EROFS while "<mount>.on" exists.
function TestFilesystem:test_read_only_then_writable_again()
	self.srv = start { host = UNLIMITED .. ("\noffline_sqlite_file = %q"):format(self.file),
		env = { LD_PRELOAD = offline.ROOT .. "/build/fault.so", FAULT_DIR = self.mnt } }
	local a = online(self.srv, "alice")
	lu.assertEquals(offer(a, "before", "kept"), "stored")
	local flag = self.mnt .. ".on"
	support.write(flag, "")
	lu.assertEquals(offer(a, "while-ro", "refused"), "internal-server-error")
	lu.assertEquals(offer(a, "while-ro2", "refused"), "internal-server-error")
	-- Group commit: five messages and a ping in one write are handled in one loop
	-- turn, so they share one commit; that commit (and its failure, told to the
	-- sender) must come before the ping's answer, which may not overtake it.
	local burst = {}
	for i = 1, 5 do burst[i] = tostring(chat("bob@localhost", "burst" .. i, "refused")) end
	burst[6] = "<iq type='get' id='burst-ping' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
	a:send(table.concat(burst))
	local got = a:collect(2)
	local order = {}
	for _, s in ipairs(got) do
		if s.name == "iq" and s.attr.id == "burst-ping" then order[#order + 1] = "pong"
		elseif s.name == "message" then order[#order + 1] = s.attr.id .. ":" .. offline.error_of(s).condition end
	end
	lu.assertEquals(order, { "burst1:internal-server-error", "burst2:internal-server-error",
		"burst3:internal-server-error", "burst4:internal-server-error", "burst5:internal-server-error", "pong" },
		"every failure is told before the ping is answered")
	-- a login while read-only cannot delete, so it delivers nothing and keeps everything
	lu.assertEquals(#offline.collect_offline(self.srv, "bob", 0.5), 0)
	lu.assertStrContains(self.srv:log(), "they stay stored")
	os.remove(flag)
	lu.assertEquals(offer(a, "after", "stored again"), "stored", "writable again without a restart")
	lu.assertEquals(shell_count(self.srv, "bob@localhost"), 2, "the counter is exact")
	lu.assertEquals(ids(offline.collect_offline(self.srv, "bob")), { "before", "after" })
	a:close()
end

-- Bad files at start: the module refuses to load on that host and leaves the file alone.
function TestFilesystem:test_bad_files_at_start()
	local garbage = self.dir .. "/garbage.sqlite"
	support.write(garbage, ("not a database at all\n"):rep(100))
	local newer = self.dir .. "/newer.sqlite"
	local db = assert(core.open_sqlite(newer))
	db:store("newer.localhost", "bob", "a@b", "<message/>", 1)
	db:close()
	assert(support.sh("sqlite3 " .. support.quote(newer) .. " 'PRAGMA user_version = 7'"))
	remount(self.mnt, "ro")
	local before = { garbage = support.read(garbage), newer = support.read(newer) }
	local hosts = {
		{ "garbage.localhost", garbage, "file is not a database" },
		{ "newer.localhost", newer, "schema version 7 was written by a newer offline-store" },
		{ "readonly.localhost", self.mnt .. "/offline.sqlite", "unable to open database file" },
	}
	local extra = {}
	for _, h in ipairs(hosts) do
		extra[#extra + 1] = ("VirtualHost %q\noffline_sqlite_file = %q\n"):format(h[1], h[2])
	end
	self.srv = start { host = table.concat(extra) }
	local log = self.srv:log()
	for _, h in ipairs(hosts) do
		lu.assertStrContains(log, h[3], false, h[1])
		lu.assertStrContains(log, "mod_offline is not loaded on " .. h[1])
	end
	lu.assertEquals(support.read(garbage), before.garbage, "not overwritten")
	lu.assertEquals(support.read(newer), before.newer, "not overwritten")
end

---------------------------------------------------------------------------------------------------
-- Hostile and extreme content, stored and delivered byte for byte. (The recipient's name
-- has SQL LIKE wildcards and a non-ASCII letter; an apostrophe is not allowed in a JID.)
TestHostile = {}

function TestHostile:tearDown() if self.srv then self.srv:cleanup() end end

function TestHostile:test_odd_content_round_trips()
	self.srv = start { host = UNLIMITED, users = { alice = PW, ["zoë%_x"] = PW } }
	local a = online(self.srv, "alice")
	local bodies = {
		sql = "'); DROP TABLE message; -- \" % _ \\ ; SELECT * FROM queue",
		unicode = "\u{202E}rtl\u{200D}\u{1F600}\u{FFFD}e\u{301} \u{10FFFD} \u{FEFF}",
		entities = "<b>&amp; &lt; &#x41; &quot;'\"</b> & < > ]]>",
		huge = ("0123456789abcdef"):rep(15000), -- 240,000 bytes, under c2s_stanza_size_limit
	}
	local order = { "sql", "unicode", "entities", "huge" }
	for _, k in ipairs(order) do
		local m = chat("zoë%_x@localhost", "id-" .. k .. "-'\"<&>", bodies[k])
		m:tag("thread"):text(bodies.sql):up()
		a:send(m)
	end
	lu.assertEquals(#messages(a:ping(10)), 0)
	local got = offline.collect_offline(self.srv, "zoë%_x", 5, nil, #order)
	lu.assertEquals(#got, #order)
	for i, k in ipairs(order) do
		lu.assertEquals(got[i].attr.id, "id-" .. k .. "-'\"<&>")
		lu.assertTrue(got[i]:get_child_text("body") == bodies[k], k .. " body differs")
		lu.assertEquals(got[i]:get_child_text("thread"), bodies.sql)
	end
	a:close()
end

function TestHostile:test_ten_thousand_to_one_user()
	self.srv = start { host = UNLIMITED }
	local a = online(self.srv, "alice")
	local sent = {}
	for i = 1, 10000 do
		sent[i] = "long-" .. i
		a:send(chat("bob@localhost", sent[i], "message " .. i))
		if i % 500 == 0 then lu.assertEquals(#messages(a:ping(20)), 0) end
	end
	lu.assertEquals(offline.sql(self.srv, "SELECT count FROM queue WHERE user = 'bob'"), "10000\n")
	local got = offline.collect_offline(self.srv, "bob", 20, nil, 10000)
	lu.assertEquals(ids(got), sent)
	lu.assertEquals(offline.sql(self.srv, "SELECT count(*) FROM message"), "0\n")
	a:close()
end

function TestHostile:test_hundred_thousand_recipients()
	local n = tonumber(os.getenv("OFFLINE_STORE_RECIPIENTS") or "100000")
	self.srv = start {}
	local names = {}
	for i = 1, n do names[i] = "r" .. i end
	make_accounts(self.srv, names)
	local senders = {}
	for i = 1, 4 do senders[i] = online(self.srv, "alice", "bulk" .. i) end
	local pid = self.srv:pid()
	collectgarbage()
	local rss_before = offline.rss_kib(pid)
	local t0, cpu0 = socket.gettime(), cpu_seconds(pid)
	for i = 1, n do
		local c = senders[i % 4 + 1]
		c:send(chat(names[i] .. "@localhost", "to-" .. names[i], "for " .. names[i]))
		if i % 2000 == 0 then
			for _, s in ipairs(senders) do lu.assertEquals(#messages(s:ping(30)), 0) end
		end
	end
	for _, s in ipairs(senders) do s:ping(30) end
	local seconds, cpu = socket.gettime() - t0, cpu_seconds(pid) - cpu0
	local rss_after = offline.rss_kib(pid)
	print(("\n  %d recipients: stored in %.1f s (%.0f msg/s), server CPU %.2f s per 1000, RSS %d -> %d KiB"):format(
		n, seconds, n / seconds, cpu * 1000 / n, rss_before, rss_after))
	lu.assertEquals(offline.sql(self.srv, "SELECT count(*), count(DISTINCT qid) FROM message"), n .. "|" .. n .. "\n")
	lu.assertTrue(rss_after - rss_before < 64 * 1024, "server memory stays bounded")
	-- a sample of recipients each get exactly their own message
	for i = 1, n, math.max(1, n // 40) do
		local got = offline.collect_offline(self.srv, names[i], 2, nil, 1)
		lu.assertEquals(ids(got), { "to-" .. names[i] }, names[i])
	end
	for _, s in ipairs(senders) do s:close() end
end

---------------------------------------------------------------------------------------------------
-- Load: 20 concurrent senders, 100,000 messages to 1,000 offline users, 20 concurrent logins.
TestLoad = {}

function TestLoad:tearDown() if self.srv then self.srv:cleanup() end end

function TestLoad:test_concurrent_senders_and_logins()
	local total = tonumber(os.getenv("OFFLINE_STORE_LOAD") or "100000")
	local n_users, n_senders = 1000, 20
	self.srv = start { host = UNLIMITED }
	local users, senders = {}, {}
	for i = 1, n_users do users[i] = "u" .. i end
	local sender_names = {}
	for i = 1, n_senders do sender_names[i] = "sender" .. i end
	make_accounts(self.srv, users)
	make_accounts(self.srv, sender_names)
	for i = 1, n_senders do senders[i] = online(self.srv, sender_names[i]) end
	local pid = self.srv:pid()
	local t0, cpu0 = socket.gettime(), cpu_seconds(pid)
	local sent_to, want, k = {}, {}, 0
	local per_sender = total // n_senders
	for round = 1, per_sender // 50 do
		for si, c in ipairs(senders) do
			for j = 1, 50 do
				k = k + 1
				local seq = (round - 1) * 50 + j
				local user = users[(k * 7919) % n_users + 1]
				local id = ("%s-%d"):format(sender_names[si], seq)
				sent_to[id] = user
				want[user] = (want[user] or 0) + 1
				c:send(chat(user .. "@localhost", id, "load " .. id))
			end
		end
		for _, c in ipairs(senders) do lu.assertEquals(#messages(c:ping(30)), 0) end
	end
	local store_s, store_cpu = socket.gettime() - t0, cpu_seconds(pid) - cpu0
	local t1, cpu1 = socket.gettime(), cpu_seconds(pid)
	local got = drain_all(self.srv, users, want, 20)
	local pop_s, pop_cpu = socket.gettime() - t1, cpu_seconds(pid) - cpu1
	print(("\n  load: %d messages, %d senders -> %d users: store %.1f s (%.0f msg/s, CPU %.2f s/1000), "
		.. "pop %.1f s (%.0f msg/s, CPU %.2f s/1000), RSS %d KiB"):format(k, n_senders, n_users, store_s, k / store_s,
		store_cpu * 1000 / k, pop_s, k / pop_s, pop_cpu * 1000 / k, offline.rss_kib(pid)))
	local must = {}
	for id in pairs(sent_to) do must[id] = true end
	lu.assertEquals(check_deliveries(got, sent_to, must), { lost = 0, duplicated = 0, foreign = 0, out_of_order = 0 })
	for _, c in ipairs(senders) do c:close() end
end
