-- offline_store.limits without a server: access rules, ACLs, the built-in default,
-- and configuration errors that name the option.

local lu = require "luaunit"
local limits = require "offline_store.limits"

local admins = { ["root@example.org"] = true }
local function is_admin(bare) return admins[bare] == true end

TestLimits = {}

function TestLimits:test_builtin_default_when_no_rule_is_defined()
	local limit = assert(limits.compile("max_user_offline_messages", nil, nil, is_admin))
	lu.assertEquals(limit("bob@example.org"), 100)
	lu.assertEquals(limit("root@example.org"), 5000)
	limit = assert(limits.compile("max_user_offline_messages", { other_rule = { { acl = "all", value = 1 } } }, nil, is_admin))
	lu.assertEquals(limit("bob@example.org"), 100)
end

function TestLimits:test_first_matching_clause_wins()
	local access = { custom = {
		{ acl = "vip", value = "infinity" },
		{ acl = "bots", value = 0 },
		{ acl = "admin", value = 7 },
		{ acl = "all", value = 3 },
	} }
	local acl = {
		vip = { "boss@example.org", "partner.example" },
		bots = { "bot-*@*", "*@bots.example.org" },
	}
	local limit = assert(limits.compile("custom", access, acl, is_admin))
	lu.assertNil(limit("boss@example.org"), "infinity")
	lu.assertNil(limit("anyone@partner.example"), "a domain entry")
	lu.assertEquals(limit("bot-7@example.org"), 0, "a pattern entry")
	lu.assertEquals(limit("x@bots.example.org"), 0)
	lu.assertEquals(limit("root@example.org"), 7)
	lu.assertEquals(limit("bob@example.org"), 3)
	lu.assertEquals(limit("bob@partner.example.com"), 3, "a domain is not a suffix")
	lu.assertEquals(limit("bot.7@example.org"), 3, "pattern dots are literal")
end

function TestLimits:test_unmatched_recipient_gets_the_default()
	local limit = assert(limits.compile("r", { r = { { acl = "vip", value = 1000 } } }, { vip = { "boss@example.org" } }, is_admin))
	lu.assertEquals(limit("boss@example.org"), 1000)
	lu.assertEquals(limit("bob@example.org"), 100)
	lu.assertEquals(limit("root@example.org"), 5000)
end

function TestLimits:test_admin_is_only_asked_when_needed()
	local asked = 0
	local limit = assert(limits.compile("r", { r = { { acl = "all", value = 9 } } }, nil,
		function() asked = asked + 1; return true end))
	lu.assertEquals(limit("bob@example.org"), 9)
	lu.assertEquals(asked, 0)
end

function TestLimits:test_configuration_errors_name_the_option()
	local function err(...)
		local ok, e = limits.compile(...)
		lu.assertNil(ok)
		return e
	end
	lu.assertStrContains(err("r", { r = { { acl = "nosuch", value = 1 } } }, nil, is_admin),
		'access.r[1].acl names an undefined ACL "nosuch"')
	lu.assertStrContains(err("r", { r = { { acl = "all", value = -1 } } }, nil, is_admin),
		'access.r[1].value must be a whole number >= 0 or "infinity" (got -1)')
	lu.assertStrContains(err("r", { r = { { acl = "all", value = 2.5 } } }, nil, is_admin), "(got 2.5)")
	lu.assertStrContains(err("r", { r = { { acl = "all", value = "lots" } } }, nil, is_admin), '(got "lots")')
	lu.assertStrContains(err("r", { r = {} }, nil, is_admin), "access.r must be a non-empty list")
	lu.assertStrContains(err("r", { r = { "all" } }, nil, is_admin), "access.r[1] must be a table")
	lu.assertStrContains(err("r", "all", nil, is_admin), "access must be a table")
	lu.assertStrContains(err("r", nil, { vip = "boss@example.org" }, is_admin), "acl.vip must be a non-empty list")
	lu.assertStrContains(err("r", nil, { vip = { 42 } }, is_admin), "acl.vip[1] must be a JID")
	lu.assertStrContains(err("r", nil, { admin = { "x@y" } }, is_admin), "is built in")
	lu.assertStrContains(err("", nil, nil, is_admin), "offline_access_max_user_messages must name an access rule")
	lu.assertStrContains(err(42, nil, nil, is_admin), "offline_access_max_user_messages must name an access rule")
end

-- The byte limit's rule (offline_access_max_user_bytes): the same clauses and ACLs, but no
-- built-in default: no rule of that name, no byte limit.
function TestLimits:test_byte_rule_without_default()
	lu.assertEquals({ limits.compile("max_user_offline_bytes", nil, nil, is_admin, true) }, { false })
	lu.assertEquals({ limits.compile("max_user_offline_bytes", { other = { { acl = "all", value = 1 } } }, nil, is_admin, true) },
		{ false }, "another rule is not this one")
	local access = { quota = { { acl = "admin", value = "infinity" }, { acl = "vip", value = 50000 } } }
	local limit = assert(limits.compile("quota", access, { vip = { "boss@example.org" } }, is_admin, true))
	lu.assertNil(limit("root@example.org"), "infinity")
	lu.assertEquals(limit("boss@example.org"), 50000)
	lu.assertNil(limit("bob@example.org"), "no clause matches: no byte limit (no default)")
	local _, err = limits.compile("quota", { quota = { { acl = "nobody", value = 1 } } }, nil, is_admin, true)
	lu.assertStrContains(err, "access.quota[1].acl names an undefined ACL")
	_, err = limits.compile("", nil, nil, is_admin, true)
	lu.assertStrContains(err, "offline_access_max_user_bytes must name an access rule")
	lu.assertEquals({ limits.describe("max_user_offline_bytes", nil, true) },
		{ "no byte limit (no rule max_user_offline_bytes)", false })
	lu.assertEquals({ limits.describe("quota", access, true) }, { "bytes rule quota: admin infinity, vip 50000", true })
end

-- Both limits of a host's settings at once, as the plugin compiles them at load and reload.
function TestLimits:test_for_settings()
	local s = { rule_name = "max_user_offline_messages", bytes_rule_name = "max_user_offline_bytes" }
	local limit, limit_bytes = limits.for_settings(s, nil, nil, is_admin)
	lu.assertEquals(limit("bob@example.org"), 100)
	lu.assertFalse(limit_bytes, "no byte rule")
	local access = { max_user_offline_bytes = { { acl = "all", value = 1000 } } }
	limit, limit_bytes = limits.for_settings(s, access, nil, is_admin)
	lu.assertEquals(limit("root@example.org"), 5000)
	lu.assertEquals(limit_bytes("bob@example.org"), 1000)
	local ok, err = limits.for_settings({ rule_name = "r", bytes_rule_name = "b" }, { r = { { acl = "vip", value = 1 } } },
		nil, is_admin)
	lu.assertNil(ok)
	lu.assertStrContains(err, "access.r[1].acl names an undefined ACL")
	ok, err = limits.for_settings({ rule_name = "r", bytes_rule_name = "b" }, { b = { { acl = "all", value = -1 } } }, nil, is_admin)
	lu.assertNil(ok)
	lu.assertStrContains(err, "access.b[1].value must be a whole number")
end
