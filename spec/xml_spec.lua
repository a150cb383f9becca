-- The C XML of util.stanza trees (src/xml.c): core.serialize must give, byte for
-- byte, what tostring(stanza) gives, on fixed cases and on random trees.

local lu = require "luaunit"
local st = require "util.stanza"
local core = require "offline_store.core"
local policy = require "offline_store.policy"

local serialize = core.serialize

TestSerialize = {}

local function same(stanza, what)
	lu.assertEquals(serialize(stanza), tostring(stanza), what)
end

function TestSerialize:test_fixed_cases()
	same(st.message({ to = "bob@example.org", type = "chat", id = "a'b\"c<d>e&f" })
		:tag("body"):text("x < y & 'z' > \"w\""):up(), "escapes in attributes and text")
	same(st.stanza("empty"), "an empty element")
	same(st.message({ xmlns = "jabber:client" }):tag("body", { xmlns = "jabber:client" }):text("same ns"):up()
		:tag("x", { xmlns = "other" }):tag("y", { xmlns = "other" }):up():up(),
		"xmlns equal to the parent's is left out")
	same(st.message():tag("x", { ["urn:ns\1attr"] = "v1", ["urn:two\1b"] = "v&2" }):up(),
		"namespaced attributes get xmlns:nsN")
	same(st.message():tag("body"):text("a"):text("b"):text(""):up(), "several text nodes")
	same(st.message({ ["xml:lang"] = "en" }):tag("body"):text("é ✓ \u{10FFFF}"):up(), "UTF-8 passes through")
	local numbers = st.stanza("n")
	numbers.attr.count = 42 -- past util.stanza's checks, as a module could
	same(numbers, "a number attribute as tostring writes it")
end

function TestSerialize:test_skip_delays_top_level_only()
	local m = st.message({ to = "bob@example.org" })
		:tag("delay", { xmlns = "urn:xmpp:delay", stamp = "2020-01-01T00:00:00Z" }):up()
		:tag("body"):text("hi"):up()
		:tag("x", { xmlns = "jabber:x:delay", stamp = "20200101T00:00:00" }):up()
		:tag("forwarded", { xmlns = "urn:xmpp:forward:0" })
			:tag("delay", { xmlns = "urn:xmpp:delay", stamp = "2019-01-01T00:00:00Z" }):up():up()
		:tag("delay", { xmlns = "not-a-delay" }):up()
	local expected = st.clone(m)
	expected:maptags(function(c)
		if (c.name == "delay" and c.attr.xmlns == "urn:xmpp:delay") or (c.name == "x" and c.attr.xmlns == "jabber:x:delay") then
			return nil
		end
		return c
	end)
	lu.assertEquals(#expected.tags, 3)
	lu.assertEquals(serialize(m, true), tostring(expected), "only the two top-level delays are left out")
	lu.assertEquals(serialize(m), tostring(m), "without the flag nothing is left out")
	lu.assertEquals(#m.tags, 5, "the stanza itself is not changed")
end

function TestSerialize:test_bad_trees_raise_like_tostring()
	lu.assertErrorMsgContains("bad argument", serialize, "<message/>")
	local bad = st.message()
	bad.attr.flag = true
	lu.assertError(tostring, bad)
	lu.assertErrorMsgContains("attribute value is a boolean", serialize, bad)
	local noattr = { name = "m" }
	lu.assertErrorMsgContains("no attr table", serialize, noattr)
end

function TestSerialize:test_too_deep_falls_back_to_lua()
	local m = st.message({ to = "bob@example.org" })
	for _ = 1, 400 do m:tag("x") end
	m:reset()
	m:tag("delay", { xmlns = "urn:xmpp:delay", stamp = "2020-01-01T00:00:00Z" }):up()
	lu.assertNil(serialize(m), "C gives up beyond its depth")
	local xml = policy.prepare(m, 1700000000 * 1000000, {})
	lu.assertEquals(#xml, #tostring(m) - #tostring(m.tags[2]), "prepare still stores it, delay stripped")
	lu.assertNil(xml:find("urn:xmpp:delay", 1, true))
end

-- Random trees: names, attributes (plain, xmlns, namespaced) and text drawn from
-- pieces that exercise escaping; each compared with tostring.
function TestSerialize:test_random_trees()
	local seed = tonumber(os.getenv("XML_SPEC_SEED") or "") or os.time()
	math.randomseed(seed)
	local pieces = { "a", "é", "'", '"', "<", ">", "&", "&amp;", " ", "\n", "x y", "]]>", "✓", "1" }
	local function text()
		local t = {}
		for i = 1, math.random(0, 6) do t[i] = pieces[math.random(#pieces)] end
		return table.concat(t)
	end
	local nss = { "jabber:client", "urn:a", "urn:b", "urn:xmpp:delay" }
	local function tree(depth)
		local attr = {}
		for _ = 1, math.random(0, 4) do
			local r = math.random(4)
			if r == 1 then attr.xmlns = nss[math.random(#nss)]
			elseif r == 2 then attr[nss[math.random(#nss)] .. "\1k" .. math.random(3)] = text()
			else attr["k" .. math.random(9)] = text() end
		end
		local el = st.stanza(({ "message", "body", "delay", "x", "e" })[math.random(5)], attr)
		for _ = 1, math.random(0, depth > 4 and 0 or 4) do
			if math.random(2) == 1 then el:text(text()) else el:add_child(tree(depth + 1)) end
		end
		return el
	end
	for i = 1, 3000 do
		local t = tree(0)
		lu.assertEquals(serialize(t), tostring(t), ("tree %d of seed %d"):format(i, seed))
	end
end
