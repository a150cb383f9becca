-- The operator-facing helpers without a server: option reading and misspelt names
-- (offline_store.options), the limits line (offline_store.limits.describe), the
-- rate-limited log (offline_store.ratelog) and JID normalisation (offline_store.admin).

if not _RUNNER then
	package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;/usr/lib/prosody/?.lua;" .. package.path
	package.cpath = "build/?.so;/usr/lib/prosody/?.so;" .. package.cpath
end
local lu = require "luaunit"
local options = require "offline_store.options"
local limits = require "offline_store.limits"
local ratelog = require "offline_store.ratelog"
local admin = require "offline_store.admin"

local function getter(t) return function(name) return t[name] end end

TestOptions = {}

function TestOptions:test_read_defaults_and_errors()
	local s = assert(options.read(getter {}, "/var/lib/prosody"))
	lu.assertEquals(s.store, { backend = "sqlite", file = "/var/lib/prosody/offline.sqlite", synchronous = "normal", busy_timeout = 2000 })
	lu.assertFalse(s.groupchat)
	lu.assertFalse(s.rule_named)
	lu.assertEquals(s.rule_name, "max_user_offline_messages")
	s = assert(options.read(getter { offline_access_max_user_messages = "mine" }, "/d"))
	lu.assertTrue(s.rule_named)
	local _, err = options.read(getter { offline_store_groupchat_messages = "yes" }, "/d")
	lu.assertEquals(err, 'offline_store_groupchat_messages must be true or false (got "yes")')
	_, err = options.read(getter { offline_sqlite_busy_timeout = -1 }, "/d")
	lu.assertStrContains(err, "offline_sqlite_busy_timeout must be a whole number")
end

function TestOptions:test_flexible_retrieval()
	lu.assertTrue(assert(options.read(getter {}, "/d")).flexible)
	lu.assertFalse(assert(options.read(getter { offline_flexible_retrieval = false }, "/d")).flexible)
	local _, err = options.read(getter { offline_flexible_retrieval = "no" }, "/d")
	lu.assertEquals(err, 'offline_flexible_retrieval must be true or false (got "no")')
	lu.assertEquals(options.unknown { offline_flexible_retrieval = true }, {})
end

function TestOptions:test_byte_rule_and_over_limit_policy()
	local s = assert(options.read(getter {}, "/d"))
	lu.assertEquals({ s.bytes_rule_name, s.bytes_rule_named, s.over_limit }, { "max_user_offline_bytes", false, "bounce" })
	for _, policy in ipairs { "bounce", "drop", "drop_oldest" } do
		s = assert(options.read(getter { offline_over_limit = policy, offline_access_max_user_bytes = "quota" }, "/d"))
		lu.assertEquals({ s.bytes_rule_name, s.bytes_rule_named, s.over_limit }, { "quota", true, policy })
	end
	for _, bad in ipairs { "dropoldest", "Drop", true, 1 } do
		local _, err = options.read(getter { offline_over_limit = bad }, "/d")
		lu.assertStrContains(err, 'offline_over_limit must be "bounce", "drop" or "drop_oldest" (got ')
	end
	lu.assertTrue(options.KNOWN.offline_access_max_user_bytes and options.KNOWN.offline_over_limit)
	lu.assertEquals(options.unknown { offline_over_limits = "drop" },
		{ "unknown option offline_over_limits is ignored (did you mean offline_over_limit?)" })
end

function TestOptions:test_report_says_byte_limit_and_policy()
	local lines = {}
	local function log(level, fmt, ...) lines[#lines + 1] = level .. " " .. fmt:format(...) end
	local s = assert(options.read(getter { offline_backend = "memory", offline_access_max_user_bytes = "quota" }, "/d"))
	options.report(s, "Loaded", {}, {}, nil, log)
	lu.assertEquals(lines, {
		'warn offline_access_max_user_bytes names the rule "quota", which the access option does not define; there is no byte limit',
		"info Loaded: memory (inside the server process, lost at restart); limits rule max_user_offline_messages: "
			.. "admin 5000, all 100 (built-in default); expiry sweep daily; no byte limit (no rule quota); over the limit: bounce" })
	lines = {}
	s = assert(options.read(getter { offline_backend = "memory", offline_over_limit = "drop_oldest" }, "/d"))
	options.report(s, "Loaded", {}, {}, { max_user_offline_bytes = { { acl = "all", value = 1000 } } }, log)
	lu.assertStrContains(lines[1], "; bytes rule max_user_offline_bytes: all 1000; over the limit: drop_oldest")
end

function TestOptions:test_delivery_options()
	local s = assert(options.read(getter {}, "/d"))
	lu.assertEquals({ s.page, s.lease }, { 100, 300 })
	lu.assertEquals(s.node, options.machine_name())
	lu.assertStrMatches(s.node, "[%w%.%-_:@]+")
	s = assert(options.read(getter { offline_delivery_page = 20, offline_delivery_lease = 60, offline_node = "a-1" }, "/d"))
	lu.assertEquals({ s.page, s.lease, s.node }, { 20, 60, "a-1" })
	for name, bad in pairs { offline_delivery_page = 0, offline_delivery_lease = 5, offline_node = "a b" } do
		local _, err = options.read(getter { [name] = bad }, "/d")
		lu.assertStrContains(err, name .. " must be")
	end
	local _, err = options.read(getter { offline_delivery_page = 2.5 }, "/d")
	lu.assertStrContains(err, "offline_delivery_page must be a whole number from 1 to 100000 (got 2.5)")
end

function TestOptions:test_unknown_names_with_suggestions()
	lu.assertEquals(options.unknown(
		{ offline_store_groupchat_message = true, offline_backend = "memory", access = {}, other_option = 1 },
		{ offline_frobnicate = 1, offline_store_groupchat_message = true }),
		{ "unknown option offline_frobnicate is ignored",
			"unknown option offline_store_groupchat_message is ignored (did you mean offline_store_groupchat_messages?)" })
	lu.assertEquals(options.unknown({}, nil), {})
end

function TestOptions:test_where_never_shows_a_password()
	lu.assertEquals(options.where { backend = "memory" }, "memory (inside the server process, lost at restart)")
	lu.assertEquals(options.where { backend = "sqlite", file = "/x/o.sqlite" }, "sqlite file /x/o.sqlite")
	local where = options.where { backend = "postgres", postgres = "host=db.example port=5433 dbname=offline user=p password=secret" }
	lu.assertEquals(where, "postgres host=db.example port=5433 dbname=offline")
	where = options.where { backend = "postgres", postgres = { database = "o", username = "u", password = "secret", host = "h" } }
	lu.assertEquals(where, "postgres host=h dbname=o")
	where = options.where { backend = "postgres", postgres = "postgresql://u:secret@h:5432/o?sslmode=require" }
	lu.assertEquals(where, "postgres host=h port=5432 dbname=o")
	lu.assertEquals(options.where { backend = "postgres", postgres = "" }, "postgres (libpq defaults)")
end

function TestOptions:test_store_changes()
	local a = { backend = "sqlite", file = "/a", synchronous = "normal", busy_timeout = 2000 }
	lu.assertEquals(options.store_changes(a, a), {})
	lu.assertEquals(options.store_changes(a, { backend = "sqlite", file = "/b", synchronous = "full", busy_timeout = 2000 }),
		{ "offline_sqlite_file", "offline_sqlite_synchronous" })
	lu.assertEquals(options.store_changes(a, { backend = "memory" }),
		{ "offline_backend", "offline_sqlite_busy_timeout", "offline_sqlite_file", "offline_sqlite_synchronous" })
end

function TestOptions:test_limits_describe()
	lu.assertEquals({ limits.describe("max_user_offline_messages", nil) },
		{ "rule max_user_offline_messages: admin 5000, all 100 (built-in default)", false })
	lu.assertEquals({ limits.describe("r", { r = { { acl = "vip", value = "infinity" }, { acl = "all", value = 3 } } }) },
		{ "rule r: vip infinity, all 3", true })
end

TestRatelog = {}

function TestRatelog:test_one_line_per_kind_per_interval_with_the_count_left_out()
	local t, lines = 100, {}
	local log = ratelog.new(function(level, fmt, ...) lines[#lines + 1] = level .. " " .. fmt:format(...) end, 60, function() return t end)
	lu.assertTrue(log:line("rejected", "warn", "full %s", "bob"))
	lu.assertFalse(log:line("rejected", "warn", "full %s", "carol"))
	lu.assertFalse(log:line("rejected", "warn", "full %s", "dave"))
	lu.assertTrue(log:line("failed", "error", "failed %d", 1), "another kind has its own interval")
	t = 159
	lu.assertFalse(log:line("rejected", "warn", "full %s", "eve"))
	t = 160
	lu.assertTrue(log:line("rejected", "warn", "full %s", "frank"))
	lu.assertTrue(log:line("failed", "error", "failed %d", 2))
	lu.assertEquals(lines, { "warn full bob", "error failed 1",
		"warn full frank (3 more like it not logged since the last one)", "error failed 2" })
end

TestAdminJid = {}

local HOSTS = { ["example.test"] = {} }

function TestAdminJid:test_user_jid_is_normalised_and_checked()
	lu.assertEquals({ admin.user_jid("Bob@EXAMPLE.test", HOSTS) }, { "bob", "example.test" })
	lu.assertEquals({ admin.user_jid("bob@", HOSTS) }, { nil, "not a valid JID: bob@" })
	lu.assertEquals({ admin.user_jid("a@b@example.test", HOSTS) }, { nil, "not a valid JID: a@b@example.test" })
	lu.assertEquals({ admin.user_jid(nil, HOSTS) }, { nil, "not a valid JID: nil" })
	lu.assertEquals({ admin.user_jid("example.test", HOSTS) }, { nil, "expected a bare JID user@host (got example.test)" })
	lu.assertEquals({ admin.user_jid("bob@example.test/r", HOSTS) }, { nil, "expected a bare JID user@host (got bob@example.test/r)" })
	lu.assertEquals({ admin.user_jid("bob@elsewhere", HOSTS) }, { nil, "no such host: elsewhere" })
	lu.assertEquals({ admin.host("EXAMPLE.Test", HOSTS) }, { "example.test" })
	lu.assertEquals({ admin.host("bob@example.test", HOSTS) }, { nil, "expected a host name (got bob@example.test)" })
	lu.assertEquals({ admin.host("elsewhere", HOSTS) }, { nil, "no such host: elsewhere" })
end

function TestAdminJid:test_list_max_must_be_a_whole_number()
	local db = { list = function() return {} end, count = function() return 0 end }
	for _, max in ipairs { "abc", "0", "-1", "2.5", 0 } do
		local ok, err = admin.list(db, "bob", "example.test", print, max)
		lu.assertNil(ok)
		lu.assertEquals(err, ("max must be a whole number >= 1 (got %s)"):format(max))
	end
	lu.assertEquals({ admin.list(db, "bob", "example.test", print) }, { true, "Listed 0 of 0 offline messages of bob@example.test" })
end
