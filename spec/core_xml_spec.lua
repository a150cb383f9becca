-- core.parse and core.delay on their own, without util.stanza, so that the
-- sanitizer and valgrind runs (spec/core_*_spec.lua) cover them: requiring
-- util.stanza there loads ICU, whose allocations the leak check reports.
-- spec/xml_spec.lua checks both against util.stanza and util.xml.

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local core = require "offline_store.core"

local mt = { __index = {} } -- stands in for util.stanza's metatable
-- (one attribute per element where serialized output is compared: attribute order
-- follows the string hash seed, which changes from run to run)

TestCoreXml = {}

function TestCoreXml:test_parse_then_delay_then_serialize()
	local xml = "<message type='chat'><body>x &lt; y &amp; é</body>"
		.. "<active xmlns='http://jabber.org/protocol/chatstates'/></message>"
	local t = core.parse(xml, mt)
	lu.assertEquals(getmetatable(t), mt)
	lu.assertEquals(core.serialize(t), xml)
	lu.assertTrue(rawequal(core.delay(t, "example.org", 1700000001, "Offline Storage"), t))
	lu.assertEquals({ #t, #t.tags }, { 3, 3 })
	local d = t[3]
	lu.assertTrue(rawequal(t.tags[3], d))
	lu.assertEquals(getmetatable(d), mt)
	lu.assertEquals({ d.name, d.attr.xmlns, d.attr.from, d.attr.stamp, d[1], #d, #d.tags },
		{ "delay", "urn:xmpp:delay", "example.org", "2023-11-14T22:13:21Z", "Offline Storage", 1, 0 })
	lu.assertStrContains(core.serialize(t), "<delay ")
	lu.assertStrContains(core.serialize(t), ">Offline Storage</delay></message>")
	lu.assertEquals(core.serialize(t, true), xml, "the delay is left out when stored again")
end

function TestCoreXml:test_parse_refuses_broken_input()
	for _, s in ipairs { "", "<", "<a", "<a>", "<a></b>", "<a/><b/>", "<a x='1' x='2'/>", "<a>&bogus;</a>",
		"<a>\xff</a>", "<a b='\1'/>", ("<a>"):rep(300) .. ("</a>"):rep(300) } do
		lu.assertNil(core.parse(s, mt), s)
	end
end

function TestCoreXml:test_delay_bad_arguments_change_nothing()
	local t = core.parse("<message><body>b</body></message>", mt)
	for i, args in ipairs {
		{ t, "a\1b", 1, "x" }, { t, "\xc0\x80", 1, "x" }, { t, "h", -1, "x" }, { t, "h", 253402300800, "x" },
		{ t, "h", 1, "\xef\xbf\xbe" }, { { name = "m", attr = {}, tags = {} }, "h", 1, "x" },
		{ setmetatable({ name = "m", attr = {} }, mt), "h", 1, "x" },
	} do
		local ok, err = pcall(core.delay, table.unpack(args, 1, 4))
		lu.assertFalse(ok, "case " .. i)
		lu.assertStrContains(err, "bad argument", false, "case " .. i)
	end
	lu.assertEquals(core.serialize(t), "<message><body>b</body></message>")
end

-- Lua code that runs while core.serialize writes (here a metamethod giving a child's
-- name; a finalizer could do the same) and serializes another tree does not write
-- into the buffer being filled; nor does an error there spoil the next call.
function TestCoreXml:test_serialize_from_inside_serialize()
	local inner = {}
	local child = setmetatable({ attr = {} }, { __index = function(_, k)
		if k == "name" then
			inner[#inner + 1] = core.serialize({ name = "inner", attr = { a = "1" }, "text" })
			return "hook"
		end
	end })
	lu.assertEquals(core.serialize({ name = "outer", attr = { b = "2" }, "x", child, "y" }),
		"<outer b='2'>x<hook/>y</outer>")
	lu.assertEquals(inner, { "<inner a='1'>text</inner>" })
	local bad = setmetatable({ attr = {} }, { __index = function() error("raised inside") end })
	lu.assertErrorMsgContains("raised inside", core.serialize, { name = "m", attr = {}, bad })
	lu.assertEquals(core.serialize({ name = "after", attr = {} }), "<after/>")
end
