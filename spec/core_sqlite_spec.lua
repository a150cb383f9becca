-- What only the sqlite backend can do or suffer: durability across reopen, and every
-- runtime failure (missing directory, read-only file, another writer holding the lock,
-- files that are not ours) returning nil, message, code and losing nothing.

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local support = require "support.util"
local core = require "offline_store.core"
local ROOT = select(2, support.sh("pwd")):gsub("%s+$", "")

local H, U, FROM, T0 = "example.org", "bob", "alice@example.org", 1700000000000000
local SQLITE_BUSY, SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_NOTADB = 5, 8, 14, 26

-- The primary result code of an extended sqlite code.
local function primary(code) return code & 0xff end

TestSqlite = {}

function TestSqlite:setUp()
	self.dir = support.tmpdir()
	self.file = self.dir .. "/offline.sqlite"
end

function TestSqlite:tearDown() support.rmrf(self.dir) end

function TestSqlite:test_reopen_finds_everything()
	local db = assert(core.open_sqlite(self.file))
	for i = 1, 10 do db:store(H, U, FROM, "m" .. i, T0 + i, i == 10 and T0 + 5 or nil) end
	db:store(H, "carol", FROM, "c", T0)
	db:close()
	db = assert(core.open_sqlite(self.file))
	lu.assertEquals({ db:count(H, U) }, { 10, 21 })
	lu.assertEquals({ db:store(H, U, FROM, "over", T0, nil, 10) }, { false, "limit", 10 }, "counter survived")
	local items, expired = db:pop(H, U, T0 + 6)
	lu.assertEquals(#items, 9)
	lu.assertEquals(expired, 1)
	lu.assertEquals(items[9].xml, "m9")
	db:close()
	db = assert(core.open_sqlite(self.file, true, 100)) -- synchronous = FULL
	lu.assertEquals(db:count(H, U), 0, "the pop was committed")
	lu.assertEquals(db:count(H, "carol"), 1)
	db:close()
end

-- Each connection caches the counter rows its stores read; another connection's
-- writes (another host on the same file, another process) must not leave it stale:
-- the limit sees them, batch or not.
function TestSqlite:test_counters_cached_by_one_connection_follow_another()
	local a = assert(core.open_sqlite(self.file))
	local b = assert(core.open_sqlite(self.file))
	for i = 1, 3 do lu.assertEquals(a:store(H, U, FROM, "a" .. i, T0, nil, 5), i) end
	for i = 1, 2 do lu.assertEquals(b:store(H, U, FROM, "b" .. i, T0), 3 + i) end
	lu.assertEquals({ a:store(H, U, FROM, "over", T0, nil, 5) }, { false, "limit", 5 },
		"a's stores see b's")
	lu.assertEquals(#b:pop(H, U, T0), 5)
	lu.assertEquals(a:store(H, U, FROM, "after b's pop", T0, nil, 1), 1)
	b:store(H, U, FROM, "b3", T0)
	assert(a:begin())
	lu.assertEquals({ a:store(H, U, FROM, "in a batch", T0, nil, 2) }, { false, "limit", 2 },
		"a batch begun after b's store sees it")
	lu.assertEquals(a:store(H, "carol", FROM, "c", T0), 1)
	assert(a:commit())
	lu.assertEquals(b:remove_user(H, U), 2)
	lu.assertEquals(a:store(H, U, FROM, "after b's removal", T0, nil, 1), 1)
	lu.assertEquals(b:delete_older_than(T0 + 1), 2)
	lu.assertEquals(a:store(H, U, FROM, "after b's purge", T0, nil, 1), 1)
	lu.assertEquals({ a:count(H, U) }, { 1, #"after b's purge" })
	a:close()
	b:close()
end

-- A pop whose emit raises in the middle (out of memory, from build/alloc_fault.so's
-- allocator) gives up the file's write lock at once: another connection with no busy timeout
-- writes at once, and the queue is intact.
function TestSqlite:test_pop_abandoned_by_an_emit_releases_the_write_lock()
	local open = package.loadlib(ROOT .. "/build/alloc_fault.so", "luaopen_alloc_fault")
	assert(open, "build/alloc_fault.so is missing: make build/alloc_fault.so")
	local fail_over = open()
	local db = assert(core.open_sqlite(self.file))
	local other = assert(core.open_sqlite(self.file, false, 0))
	lu.assertEquals(db:store(H, U, FROM, "small", T0), 1)
	lu.assertEquals(db:store(H, U, FROM, string.rep("x", 100000), T0), 2)
	fail_over(65536)
	local ok, err = pcall(db.pop, db, H, U, T0)
	fail_over(nil)
	lu.assertFalse(ok, "the emit raised")
	lu.assertStrContains(tostring(err), "not enough memory")
	local count, msg = other:store(H, U, FROM, "meanwhile", T0)
	lu.assertEquals(count, 3, "the other connection wrote at once: " .. tostring(msg))
	other:close()
	lu.assertEquals(#assert(db:pop(H, U, T0)), 3, "nothing was taken by the abandoned pop")
	db:close()
end

function TestSqlite:test_missing_directory()
	local db, msg, code = core.open_sqlite(self.dir .. "/no/such/dir/offline.sqlite")
	lu.assertNil(db)
	lu.assertStrContains(msg, "no/such/dir/offline.sqlite")
	lu.assertStrContains(msg, "unable to open database file")
	lu.assertEquals(primary(code), SQLITE_CANTOPEN)
end

function TestSqlite:test_read_only_file_is_refused()
	local db = assert(core.open_sqlite(self.file))
	db:store(H, U, FROM, "kept", T0)
	db:close()
	local before = support.read(self.file)
	support.exec("chmod 0555 " .. support.quote(self.dir) .. " && chmod 0444 " .. support.quote(self.file))
	-- root ignores file modes, so the check runs as an unprivileged user when we are root
	local prefix = ""
	if support.sh("test \"$(id -u)\" = 0") then prefix = "setpriv --reuid=nobody --regid=nogroup --clear-groups " end
	-- the child loads the same core build, so it needs the same preloaded runtime (test-asan);
	-- the checkout may sit in a directory that user cannot enter (root's home, a mktemp -d),
	-- so the child loads a copy from a directory of its own that everyone can read
	prefix = prefix .. "env LD_PRELOAD=" .. support.quote(os.getenv("LD_PRELOAD") or "") .. " "
	local lib = support.tmpdir()
	local built = assert(package.searchpath("offline_store.core", package.cpath))
	assert(support.exec(("mkdir %s && cp %s %s && chmod -R a+rX %s"):format(support.quote(lib .. "/offline_store"),
		support.quote(built), support.quote(lib .. "/offline_store/core.so"), support.quote(lib))))
	local ok, out = support.sh(prefix .. "lua5.4 -e " .. support.quote(([[
		package.cpath = %q
		local db, msg, code = require("offline_store.core").open_sqlite(%q)
		print(db, msg, code)
	]]):format(lib .. "/?.so", self.file)))
	support.rmrf(lib)
	support.exec("chmod 0755 " .. support.quote(self.dir) .. " && chmod 0644 " .. support.quote(self.file))
	lu.assertTrue(ok, out)
	lu.assertStrContains(out, "nil")
	lu.assertStrContains(out, "file is read-only")
	lu.assertStrContains(out, tostring(SQLITE_READONLY))
	lu.assertEquals(support.read(self.file), before, "the file is untouched")
	db = assert(core.open_sqlite(self.file))
	lu.assertEquals(db:count(H, U), 1)
	db:close()
end

-- A sender equal to the stanza's own from='...' is not stored twice.
function TestSqlite:test_sender_from_the_stanza_is_not_stored_twice()
	local db = assert(core.open_sqlite(self.file))
	db:store(H, U, "alice@example.org/phone", "<message from='alice@example.org/phone'/>", T0)
	db:store(H, U, "alice@example.org/phone", "<message from='someone@else.org'/>", T0)
	db:store(H, U, "a&b@example.org", "<message from='a&amp;b@example.org'/>", T0)
	db:close()
	local ok, out = support.sh("sqlite3 " .. support.quote(self.file)
		.. " \"SELECT typeof(sender) || ':' || length(sender) FROM message ORDER BY id\"")
	assert(ok, out)
	lu.assertEquals(out, "blob:0\ntext:23\ntext:15\n", "elided only when equal and free of entities")
	db = assert(core.open_sqlite(self.file))
	lu.assertEquals(db:list(H, U)[1].from, "alice@example.org/phone")
	db:close()
end

-- Group commit: what a batch stores is invisible to other connections until the
-- commit, and close() commits an open batch rather than dropping it.
function TestSqlite:test_batch_is_one_transaction()
	local db = assert(core.open_sqlite(self.file))
	local other = assert(core.open_sqlite(self.file, false, 50))
	lu.assertTrue(db:begin())
	for i = 1, 3 do db:store(H, U, FROM, "b" .. i, T0) end
	lu.assertEquals({ other:count(H, U) }, { 0, 0 }, "not visible before the commit")
	lu.assertNil(other:store(H, U, FROM, "x", T0), "the batch holds the write lock")
	lu.assertTrue(db:commit())
	lu.assertEquals(other:count(H, U), 3)
	lu.assertTrue(db:begin())
	db:store(H, U, FROM, "b4", T0)
	db:close()
	lu.assertEquals(other:count(H, U), 4, "close committed the open batch")
	other:close()
end

-- A store that fails inside a batch (here: the disk is full) takes the whole batch
-- with it, says so, and leaves the store usable and its counters right.
function TestSqlite:test_failed_store_ends_the_batch()
	local mnt = self.dir .. "/small"
	support.exec("mkdir -p " .. support.quote(mnt))
	local ok, out = support.sh("mount -t tmpfs -o size=512k tmpfs " .. support.quote(mnt))
	assert(ok, "this spec mounts a small tmpfs (run as root): " .. out)
	local db = assert(core.open_sqlite(mnt .. "/db.sqlite"))
	local fine, bad = pcall(function()
		lu.assertEquals(db:store(H, U, FROM, "kept", T0), 1)
		lu.assertTrue(db:begin())
		local big, n = string.rep("x", 4000), 0
		local count, msg, code
		repeat
			n = n + 1
			count, msg, code = db:store(H, U, FROM, big, T0)
		until not count or n > 1000
		lu.assertNil(count, "the disk filled up")
		lu.assertIsString(msg)
		lu.assertIsNumber(code)
		lu.assertTrue(n > 2, "some stores went into the batch first")
		lu.assertTrue(db:commit(), "the failed store ended the batch: nothing left to commit")
		lu.assertEquals({ db:count(H, U) }, { 1, 4 }, "nothing of the batch stayed")
		lu.assertEquals(#db:list(H, U), 1)
		lu.assertEquals(db:store(H, U, FROM, "after", T0), 2, "the store works on")
	end)
	db:close()
	support.sh("umount " .. support.quote(mnt))
	if not fine then error(bad, 0) end
end

function TestSqlite:test_busy_writer_gives_fail_triple_and_loses_nothing()
	local db = assert(core.open_sqlite(self.file, false, 50))
	lu.assertEquals(db:store(H, U, FROM, "first", T0), 1)
	-- another process takes the write lock and holds it for a while
	local hold = support.quote(self.dir .. "/holding")
	support.exec(("sqlite3 -cmd 'BEGIN IMMEDIATE' -cmd \".shell touch %s\" -cmd '.shell sleep 2' %s 'COMMIT' >/dev/null 2>&1 &")
		:format(hold, support.quote(self.file)))
	for _ = 1, 200 do
		if support.read(self.dir .. "/holding") then break end
		support.exec("sleep 0.02")
	end
	local ok, msg, code = db:store(H, U, FROM, "second", T0)
	lu.assertNil(ok)
	lu.assertStrContains(msg, "locked")
	lu.assertEquals(primary(code), SQLITE_BUSY)
	local items, pmsg, pcode = db:pop(H, U, T0)
	lu.assertNil(items, "pop cannot take the lock either")
	lu.assertEquals(primary(pcode), SQLITE_BUSY, pmsg)
	lu.assertEquals({ db:count(H, U) }, { 1, 5 }, "no half-written row, counter unchanged")
	-- once the other writer is done, everything works again
	local stored
	for _ = 1, 100 do
		stored = db:store(H, U, FROM, "third", T0)
		if stored then break end
		support.exec("sleep 0.05")
	end
	lu.assertEquals(stored, 2)
	local popped = db:pop(H, U, T0)
	lu.assertEquals({ popped[1].xml, popped[2].xml }, { "first", "third" })
	db:close()
end

function TestSqlite:test_not_a_database_is_refused_and_untouched()
	local garbage = ("this is not an sqlite file\n"):rep(200)
	support.write(self.file, garbage)
	local db, msg, code = core.open_sqlite(self.file)
	lu.assertNil(db)
	lu.assertStrContains(msg, "file is not a database")
	lu.assertEquals(primary(code), SQLITE_NOTADB)
	lu.assertEquals(support.read(self.file), garbage)
end

function TestSqlite:test_foreign_database_is_refused_and_untouched()
	assert(support.sh("sqlite3 " .. support.quote(self.file) .. " 'CREATE TABLE accounts(x); INSERT INTO accounts VALUES (1)'"))
	local before = support.read(self.file)
	local db, msg, code = core.open_sqlite(self.file)
	lu.assertNil(db)
	lu.assertStrContains(msg, "not an offline-store database")
	lu.assertEquals(code, SQLITE_NOTADB)
	lu.assertEquals(support.read(self.file), before)
end

function TestSqlite:test_newer_schema_is_refused_and_untouched()
	local db = assert(core.open_sqlite(self.file))
	db:store(H, U, FROM, "from the future", T0)
	db:close()
	assert(support.sh("sqlite3 " .. support.quote(self.file) .. " 'PRAGMA user_version = 99'"))
	local before = support.read(self.file)
	local db2, msg = core.open_sqlite(self.file)
	lu.assertNil(db2)
	lu.assertStrContains(msg, "schema version 99 was written by a newer offline-store")
	lu.assertEquals(support.read(self.file), before)
end

function TestSqlite:test_file_is_wal_and_versioned()
	assert(core.open_sqlite(self.file)):close()
	local ok, out = support.sh("sqlite3 " .. support.quote(self.file)
		.. " 'PRAGMA journal_mode; PRAGMA user_version; PRAGMA application_id'")
	lu.assertTrue(ok, out)
	lu.assertEquals(out, "wal\n5\n" .. 0x4f464c53 .. "\n")
end

-- A version 2 file as that release wrote it: messages clustered by (host, user, id),
-- one of them with its sender elided (zero-length BLOB: the stanza's own from).
local V2_SCHEMA = [[
PRAGMA journal_mode = WAL;
CREATE TABLE message (host TEXT NOT NULL, user TEXT NOT NULL, id INTEGER NOT NULL,
 ts INTEGER NOT NULL, expire INTEGER, sender TEXT NOT NULL, stanza BLOB NOT NULL, meta BLOB,
 PRIMARY KEY (host, user, id)) WITHOUT ROWID;
CREATE INDEX message_expire ON message(expire) WHERE expire IS NOT NULL;
CREATE TABLE queue (host TEXT NOT NULL, user TEXT NOT NULL, count INTEGER NOT NULL,
 bytes INTEGER NOT NULL, PRIMARY KEY (host, user)) WITHOUT ROWID;
CREATE TABLE sequence (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
PRAGMA user_version = 2; PRAGMA application_id = 1330007123;
]]

local function write_v2(file, rows, seq)
	local sql = { V2_SCHEMA, ("INSERT INTO sequence VALUES ('message', %d);"):format(seq) }
	local queues, order = {}, {}
	for _, r in ipairs(rows) do
		sql[#sql + 1] = ("INSERT INTO message VALUES ('%s', '%s', %d, %d, %s, %s, '%s', NULL);"):format(
			r.host, r.user, r.id, r.ts, r.expire or "NULL", r.sender and ("'" .. r.sender .. "'") or "x''", (r.xml:gsub("'", "''")))
		local key = r.host .. "\0" .. r.user
		if not queues[key] then queues[key] = { r.host, r.user, 0, 0 }; order[#order + 1] = key end
		queues[key][3], queues[key][4] = queues[key][3] + 1, queues[key][4] + #r.xml
	end
	for _, key in ipairs(order) do
		local q = queues[key]
		sql[#sql + 1] = ("INSERT INTO queue VALUES ('%s', '%s', %d, %d);"):format(q[1], q[2], q[3], q[4])
	end
	local script = file .. ".sql"
	support.write(script, table.concat(sql, "\n"))
	assert(support.sh("sqlite3 " .. support.quote(file) .. " < " .. support.quote(script)))
end

local function sqlite3(file, sql)
	local ok, out = support.sh("sqlite3 " .. support.quote(file) .. " " .. support.quote(sql))
	assert(ok, out)
	return out
end

function TestSqlite:test_version_2_file_is_migrated_losing_nothing()
	local own = "<message from='alice@example.org/x' to='bob@example.org'><body>own</body></message>"
	write_v2(self.file, {
		{ host = H, user = U, id = 3, ts = T0 + 3, sender = FROM, xml = "<m>3</m>" },
		{ host = H, user = "carol", id = 4, ts = T0 + 4, sender = FROM, xml = "<m>c</m>" },
		{ host = H, user = U, id = 7, ts = T0 + 7, expire = T0 + 100, xml = own },
		{ host = H, user = U, id = 9, ts = T0 + 9, sender = FROM, xml = "<m>9</m>" },
	}, 9)
	local db = assert(core.open_sqlite(self.file))
	lu.assertEquals({ db:count(H, U) }, { 3, 8 + #own + 8 })
	lu.assertEquals(select(2, db:store(H, U, FROM, "<m>new</m>", T0 + 10)), 10, "the sequence goes on")
	local got = {}
	for _, it in ipairs(db:pop(H, U, T0)) do got[#got + 1] = { it.id, it.ts, it.expire, it.from, it.xml } end
	lu.assertEquals(got, {
		{ 3, T0 + 3, nil, FROM, "<m>3</m>" },
		{ 7, T0 + 7, T0 + 100, "alice@example.org/x", own },
		{ 9, T0 + 9, nil, FROM, "<m>9</m>" },
		{ 10, T0 + 10, nil, FROM, "<m>new</m>" },
	})
	lu.assertEquals(#db:pop(H, "carol", T0), 1)
	db:close()
	lu.assertEquals(sqlite3(self.file, "PRAGMA user_version"), "5\n")
	lu.assertStrContains(sqlite3(self.file, "SELECT sql FROM sqlite_schema WHERE name = 'message'"),
		"id INTEGER PRIMARY KEY, qid INTEGER NOT NULL")
	lu.assertEquals(sqlite3(self.file, "SELECT name FROM sqlite_schema WHERE tbl_name = 'message' ORDER BY name"),
		"message\nmessage_dedup\nmessage_expire\nmessage_lease\nmessage_queue\n")
end

-- A version 3 file as that release wrote it: messages in a rowid table with their
-- host and user. carol@other.example has a message but no counter row, which no
-- release wrote: the migration must count it, not drop it.
local V3_SCHEMA = [[
PRAGMA journal_mode = WAL;
CREATE TABLE queue (host TEXT NOT NULL, user TEXT NOT NULL, count INTEGER NOT NULL,
 bytes INTEGER NOT NULL, PRIMARY KEY (host, user)) WITHOUT ROWID;
CREATE TABLE sequence (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE message (id INTEGER PRIMARY KEY, host TEXT NOT NULL, user TEXT NOT NULL,
 ts INTEGER NOT NULL, expire INTEGER, sender TEXT NOT NULL, stanza BLOB NOT NULL, meta BLOB);
CREATE INDEX message_queue ON message(host, user);
CREATE INDEX message_expire ON message(expire) WHERE expire IS NOT NULL;
INSERT INTO sequence VALUES ('message', 12);
INSERT INTO message VALUES (2, 'example.org', 'bob', 1002, NULL, 'alice@example.org', '<m>2</m>', NULL);
INSERT INTO message VALUES (5, 'other.example', 'bob', 1005, 9005, 'alice@example.org', '<m>o</m>', x'6d');
INSERT INTO message VALUES (7, 'example.org', 'bob', 1007, NULL, x'', '<message from=''a@b/c''/>', NULL);
INSERT INTO message VALUES (9, 'other.example', 'carol', 1009, NULL, 'dave@example.org', '<m>c</m>', NULL);
INSERT INTO message VALUES (12, 'example.org', 'bob', 1012, NULL, 'alice@example.org', '<m>12</m>', NULL);
INSERT INTO queue VALUES ('example.org', 'bob', 3, 40);
INSERT INTO queue VALUES ('other.example', 'bob', 1, 8);
PRAGMA user_version = 3; PRAGMA application_id = 1330007123;
]]

function TestSqlite:test_version_3_file_is_migrated_losing_nothing()
	local script = self.file .. ".sql"
	support.write(script, V3_SCHEMA)
	assert(support.sh("sqlite3 " .. support.quote(self.file) .. " < " .. support.quote(script)))
	local db = assert(core.open_sqlite(self.file))
	lu.assertEquals({ db:count("example.org", "bob") }, { 3, 40 })
	lu.assertEquals({ db:count("other.example", "bob") }, { 1, 8 })
	lu.assertEquals({ db:count("other.example", "carol") }, { 1, 8 }, "counted from its message")
	lu.assertEquals(select(2, db:store("example.org", "bob", FROM, "<m>new</m>", 1013)), 13, "the sequence goes on")
	local function items(host, user)
		local got = {}
		for _, it in ipairs(assert(db:pop(host, user, 1000))) do
			got[#got + 1] = { it.id, it.ts, it.expire, it.from, it.xml, it.meta }
		end
		return got
	end
	lu.assertEquals(items("example.org", "bob"), {
		{ 2, 1002, nil, "alice@example.org", "<m>2</m>" },
		{ 7, 1007, nil, "a@b/c", "<message from='a@b/c'/>" },
		{ 12, 1012, nil, "alice@example.org", "<m>12</m>" },
		{ 13, 1013, nil, FROM, "<m>new</m>" },
	})
	lu.assertEquals(items("other.example", "bob"), { { 5, 1005, 9005, "alice@example.org", "<m>o</m>", "m" } })
	lu.assertEquals(items("other.example", "carol"), { { 9, 1009, nil, "dave@example.org", "<m>c</m>" } })
	db:close()
	lu.assertEquals(sqlite3(self.file, "PRAGMA user_version"), "5\n")
	lu.assertEquals(sqlite3(self.file, "SELECT count(*) FROM message; SELECT count(*) FROM queue"), "0\n0\n")
	lu.assertEquals(sqlite3(self.file, "SELECT name FROM sqlite_schema WHERE tbl_name IN ('message', 'queue') ORDER BY name"),
		"message\nmessage_dedup\nmessage_expire\nmessage_lease\nmessage_queue\nqueue\nsqlite_autoindex_queue_1\n")
end

-- A version 4 file as that release wrote it (queue ids, messages keyed by them): it
-- gains the lease and dedup columns under the same write lock, every row kept as it
-- was, counters included; the rows can then be leased and keyed.
local V4_SCHEMA = [[
PRAGMA journal_mode = WAL;
CREATE TABLE sequence (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, host TEXT NOT NULL, user TEXT NOT NULL,
 count INTEGER NOT NULL, bytes INTEGER NOT NULL, UNIQUE (host, user));
CREATE TABLE message (id INTEGER PRIMARY KEY, qid INTEGER NOT NULL, ts INTEGER NOT NULL,
 expire INTEGER, sender TEXT NOT NULL, stanza BLOB NOT NULL, meta BLOB);
CREATE INDEX message_queue ON message(qid);
CREATE INDEX message_expire ON message(expire) WHERE expire IS NOT NULL;
INSERT INTO sequence VALUES ('message', 21);
INSERT INTO queue VALUES (1, 'example.org', 'bob', 3, 44);
INSERT INTO queue VALUES (4, 'example.org', 'carol', 1, 8);
INSERT INTO message VALUES (3, 1, 1003, NULL, 'alice@example.org', '<m>3</m>', NULL);
INSERT INTO message VALUES (8, 4, 1008, 9008, 'dave@example.org', '<m>c</m>', x'6d');
INSERT INTO message VALUES (11, 1, 1011, NULL, x'', '<message from=''a@b/c''/>', NULL);
INSERT INTO message VALUES (20, 1, 1020, NULL, 'alice@example.org', 'offline-store', 'offline-store:set-aside');
PRAGMA user_version = 4; PRAGMA application_id = 1330007123;
]]

function TestSqlite:test_version_4_file_gains_leases_and_keys_losing_nothing()
	local script = self.file .. ".sql"
	support.write(script, V4_SCHEMA)
	assert(support.sh("sqlite3 " .. support.quote(self.file) .. " < " .. support.quote(script)))
	local db = assert(core.open_sqlite(self.file))
	lu.assertEquals({ db:count("example.org", "bob") }, { 3, 44 })
	lu.assertEquals({ db:count("example.org", "carol") }, { 1, 8 })
	local function rows(user)
		local got = {}
		for _, it in ipairs(assert(db:list("example.org", user))) do
			got[#got + 1] = { it.id, it.ts, it.expire, it.from, it.xml, it.meta, it.lease_owner }
		end
		return got
	end
	local bob = {
		{ 3, 1003, nil, "alice@example.org", "<m>3</m>" },
		{ 11, 1011, nil, "a@b/c", "<message from='a@b/c'/>" },
		{ 20, 1020, nil, "alice@example.org", "offline-store", core.SET_ASIDE },
	}
	lu.assertEquals(rows("bob"), bob)
	lu.assertEquals(rows("carol"), { { 8, 1008, 9008, "dave@example.org", "<m>c</m>", "m" } })
	lu.assertEquals(#db:lease("example.org", "bob", "n:1", 1000, 2000), 2)
	lu.assertEquals({ db:store("example.org", "bob", FROM, "<m>new</m>", 1030, nil, nil, nil, nil, "k") }, { 4, 22 })
	lu.assertEquals({ db:store("example.org", "bob", FROM, "<m>new</m>", 1030, nil, nil, nil, nil, "k") },
		{ false, "duplicate", 4 })
	lu.assertEquals(db:release_all(), 2)
	local popped = {}
	for i, it in ipairs(assert(db:pop("example.org", "bob", 1000))) do popped[i] = it.xml end
	lu.assertEquals(popped, { "<m>3</m>", "<message from='a@b/c'/>", "<m>new</m>" })
	db:close()
	lu.assertEquals(sqlite3(self.file, "PRAGMA user_version"), "5\n")
	lu.assertStrContains(sqlite3(self.file, "SELECT sql FROM sqlite_schema WHERE name = 'message'"),
		"lease_owner BLOB, lease_until INTEGER, dedup BLOB")
end

-- A queue emptied and dropped never gives its id to another: a message row left
-- behind by any mishap could otherwise reach a user it was not stored for.
function TestSqlite:test_queue_ids_are_never_reused()
	local db = assert(core.open_sqlite(self.file))
	db:store(H, "dave", FROM, "<m>d</m>", T0)
	lu.assertEquals(#db:pop(H, "dave", T0), 1)
	db:store(H, "erin", FROM, "<m>e</m>", T0)
	db:close()
	lu.assertEquals(sqlite3(self.file, "SELECT id, user FROM queue"), "2|erin\n")
end

function TestSqlite:test_failed_migration_is_rolled_back()
	-- the same id under two users: possible under version 2's key, not as a rowid
	write_v2(self.file, {
		{ host = H, user = U, id = 5, ts = T0, sender = FROM, xml = "<m>u</m>" },
		{ host = H, user = "carol", id = 5, ts = T0, sender = FROM, xml = "<m>c</m>" },
	}, 5)
	local before = sqlite3(self.file, ".dump")
	local db, msg = core.open_sqlite(self.file)
	lu.assertNil(db)
	lu.assertStrContains(msg, "migrating schema to version 3")
	lu.assertStrContains(msg, "UNIQUE constraint failed")
	lu.assertEquals(sqlite3(self.file, ".dump"), before, "still the version 2 file, every row in it")
	lu.assertEquals(sqlite3(self.file, "PRAGMA user_version"), "2\n")
end

-- Several processes opening one fresh file at the same moment (prosodyctl next to a
-- starting server, two hosts, two nodes): each one must find the schema either absent or
-- complete, never migrate it a second time. 4 processes per file, released together by a
-- fifo (each reads it until the writer closes it), each opens, stores one message, closes.
-- (Before reading and migrating the schema under one write lock, about half failed.)
function TestSqlite:test_concurrent_openers_of_a_fresh_file_all_succeed()
	local N, FILES = 4, 30
	local child = self.dir .. "/child.lua"
	support.write(child, ([[
		package.cpath = %q
		local core = require "offline_store.core"
		local file, fifo, user = ...
		local f = assert(io.open(fifo, "r"))
		assert(io.open(fifo .. "." .. user, "w")):close()
		f:read("a"); f:close()
		local db, msg = core.open_sqlite(file, false, 10000)
		if not db then print("open: " .. msg) os.exit(1) end
		local ok, why = db:store(%q, user, %q, "<m>" .. user .. "</m>", %d)
		if not ok then print("store: " .. why) os.exit(1) end
		db:close()
		print("ok")
	]]):format(package.cpath, H, FROM, T0))
	child = support.quote(child)
	-- the child loads the same core build, so it needs the same preloaded runtime (test-asan)
	local env = "env LD_PRELOAD=" .. support.quote(os.getenv("LD_PRELOAD") or "") .. " "
	local failures = {}
	for f = 1, FILES do
		local file, fifo = ("%s/race%d.sqlite"):format(self.dir, f), ("%s/go%d"):format(self.dir, f)
		local script = { "mkfifo " .. support.quote(fifo) }
		for i = 1, N do
			script[#script + 1] = ("%slua5.4 %s %s %s u%d > %s 2>&1 < /dev/null &"):format(env, child,
				support.quote(file), support.quote(fifo), i, support.quote(("%s/out%d.%d"):format(self.dir, f, i)))
		end
		-- the writer waits until every child has the fifo open; all read EOF when it leaves
		script[#script + 1] = ("exec 3>%s; while [ $(ls %s.u* | wc -l) -lt %d ]; do sleep 0.01; done; exec 3>&-; wait")
			:format(support.quote(fifo), support.quote(fifo), N)
		assert(support.sh(table.concat(script, "\n")))
		for i = 1, N do
			local out = support.read(("%s/out%d.%d"):format(self.dir, f, i)) or "(no output)"
			if out ~= "ok\n" then failures[#failures + 1] = ("file %d, process %d: %s"):format(f, i, out) end
		end
		local db, msg = core.open_sqlite(file)
		if not db then
			failures[#failures + 1] = ("file %d: reopen: %s"):format(f, msg)
		else
			for i = 1, N do
				local items = db:list(H, "u" .. i)
				if not items or #items ~= 1 or items[1].xml ~= "<m>u" .. i .. "</m>" then
					failures[#failures + 1] = ("file %d: u%d's message is missing"):format(f, i)
				end
			end
			db:close()
		end
	end
	lu.assertEquals(failures, {})
end

function TestSqlite:test_bad_open_arguments_raise()
	lu.assertErrorMsgContains("string expected", function() core.open_sqlite() end)
	lu.assertErrorMsgContains("must be 0 to 2147483647", function() core.open_sqlite(self.file, false, -1) end)
	-- sqlite takes an int: 4294967301 must not become 5 ms
	lu.assertErrorMsgContains("must be 0 to 2147483647", function() core.open_sqlite(self.file, false, 4294967301) end)
	lu.assertErrorMsgContains("must be 0 to 2147483647", function() core.open_sqlite(self.file, false, 2147483648) end)
	assert(core.open_sqlite(self.file, false, 2147483647)):close()
end

-- Strings longer than an int: a 4 GiB + 5 stanza was bound as its first 5 bytes, a
-- key as its first byte. Needs about 7 GB of memory, so it runs only
-- with OFFLINE_STORE_BIG_TESTS=1. Over sqlite's own limit (a billion bytes) the bind
-- says SQLITE_TOOBIG, now checked; beyond 2 GiB the core refuses first.
function TestSqlite:test_strings_over_the_length_limits_are_refused_whole()
	lu.skipIf(os.getenv("OFFLINE_STORE_BIG_TESTS") ~= "1", "set OFFLINE_STORE_BIG_TESTS=1 to run (about 7 GB)")
	local db = assert(core.open_sqlite(self.file))
	local over_sqlite = ("x"):rep(1000000001)
	local ok, msg, code = db:store(H, U, FROM, over_sqlite, T0)
	lu.assertNil(ok)
	lu.assertStrContains(msg, "too big")
	lu.assertEquals(primary(code), 18) -- SQLITE_TOOBIG
	over_sqlite = nil -- luacheck: ignore 311 (dropped for the collector)
	collectgarbage()
	local half = ("x"):rep(0x7fffffff) -- (the string library makes nothing longer)
	local over_int = half .. half .. "xxxxxxx" -- 2^32 + 5 bytes
	half = nil -- luacheck: ignore 311
	ok, msg = db:store(H, U, FROM, over_int, T0)
	lu.assertNil(ok)
	lu.assertStrContains(msg, "message too large to store")
	lu.assertErrorMsgContains("longer than 2147483647 bytes", db.store, db, H, over_int, FROM, "<m/>", T0)
	lu.assertErrorMsgContains("longer than 2147483647 bytes", db.count, db, over_int, U)
	over_int = nil -- luacheck: ignore 311
	collectgarbage()
	lu.assertEquals({ db:count(H, U) }, { 0, 0 }, "nothing was stored")
	lu.assertEquals({ db:count(H, "x") }, { 0, 0 }, "nothing under a cut key either")
	lu.assertEquals(db:store(H, U, FROM, "<m/>", T0), 1, "the store works on")
	db:close()
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
