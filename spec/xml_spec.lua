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
	-- (the C escaper finds the next character to escape with strcspn, which stops
	-- at a NUL too: an embedded one must be written and stepped over, as tostring does)
	local nul = st.stanza("a")
	nul.attr.v = "x\0<y\0"
	nul[1] = "\0a&b\0\0'c'"
	same(nul, "embedded NULs, past util.stanza's checks")
	-- (the escaper reads the namespace as a prefix of the "ns\1name" key; a name
	-- that needs escaping gets past util.stanza's checks only this way)
	local ns_escaped = st.stanza("x")
	ns_escaped.attr["urn:q&'<\1k>"] = "v"
	same(ns_escaped, "a namespace that needs escaping")
end

function TestSerialize:test_skip_delays_top_level_only()
	local m = st.message({ to = "bob@example.org" })
		:tag("delay", { xmlns = "urn:xmpp:delay", stamp = "2020-01-01T00:00:00Z" }):up()
		:tag("body"):text("hi"):up()
		:tag("x", { xmlns = "jabber:x:delay", stamp = "20200101T00:00:00" }):up()
		:tag("forwarded", { xmlns = "urn:xmpp:forward:0" })
			:tag("delay", { xmlns = "urn:xmpp:delay", stamp = "2019-01-01T00:00:00Z" }):up():up()
		:tag("delay", { xmlns = "not-a-delay" }):up()
	local out = serialize(m, true)
	lu.assertEquals(serialize(m), tostring(m), "without the flag nothing is left out")
	lu.assertEquals(#m.tags, 5, "the stanza itself is not changed")
	-- the same tables without the two top-level delays (a copy would walk its
	-- attributes in another order)
	m:maptags(function(c)
		if (c.name == "delay" and c.attr.xmlns == "urn:xmpp:delay") or (c.name == "x" and c.attr.xmlns == "jabber:x:delay") then
			return nil
		end
		return c
	end)
	lu.assertEquals(#m.tags, 3)
	lu.assertEquals(out, tostring(m), "only the two top-level delays are left out")
end

-- What db:store keeps is, byte for byte, tostring of a copy without the top-level
-- delays: with only delays as children, that copy is an empty element.
function TestSerialize:test_skip_delays_only_delays_gives_self_closing()
	local m = st.message({ to = "bob@example.org", id = "d" })
		:tag("delay", { xmlns = "urn:xmpp:delay", stamp = "2020-01-01T00:00:00Z" }):up()
		:tag("x", { xmlns = "jabber:x:delay", stamp = "20200101T00:00:00" }):up()
	local out = serialize(m, true)
	m:maptags(function() return nil end)
	lu.assertEquals(#m, 0)
	lu.assertEquals(out, tostring(m))
	lu.assertStrContains(out, "/>")
	-- an empty text node is a child: tostring writes a start and an end tag
	local t = st.message({ id = "t" }):tag("delay", { xmlns = "urn:xmpp:delay" }):up()
	t[#t + 1] = ""
	local with_text = serialize(t, true)
	t:maptags(function() return nil end)
	lu.assertEquals(with_text, tostring(t))
end

-- tostring leaves out an xmlns equal to the parent's by Lua equality: a number
-- equal to the parent's number too (past util.stanza's checks, as a module could).
function TestSerialize:test_numeric_xmlns_equal_to_parent()
	local m = st.stanza("a")
	m.attr.xmlns = 1
	local child = st.stanza("b")
	child.attr.xmlns = 1
	m:add_direct_child(child)
	local other = st.stanza("c")
	other.attr.xmlns = "1" -- a string is not equal to the number: written
	m:add_direct_child(other)
	same(m, "numeric xmlns")
	lu.assertEquals(serialize(m), "<a xmlns='1'><b/><c xmlns='1'/></a>")
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
	local pieces = { "a", "é", "'", '"', "<", ">", "&", "&amp;", " ", "\n", "x y", "]]>", "✓", "1",
		string.rep("long text without anything to escape ", 3) }
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

-- core.parse reads back what core.serialize writes: the same tree as util.xml.parse
-- for every input in its subset, nil (the caller then uses util.xml.parse) for any other.

local xml_parse = require "util.xml".parse
local stanza_mt = getmetatable(st.stanza("x"))
local function parse(s) return core.parse(s, stanza_mt) end

-- The children of el, adjacent text nodes joined (expat may split a text run
-- where core.parse gives one node).
local function merged_children(el)
	local out = {}
	for i = 1, #el do
		local c = el[i]
		if type(c) == "string" and type(out[#out]) == "string" then
			out[#out] = out[#out] .. c
		else
			out[#out + 1] = c
		end
	end
	return out
end

-- The first difference between two util.stanza trees as a string, or nil: names,
-- attr tables, children in order, tags (exactly the element children, in order,
-- on both sides), metatables, and no other fields than util.stanza's.
local function tree_diff(a, b, path)
	path = (path or "") .. "/" .. tostring(a.name)
	if getmetatable(a) ~= stanza_mt or getmetatable(b) ~= stanza_mt then return path .. ": metatable" end
	if a.name ~= b.name then return path .. ": name " .. tostring(b.name) end
	for _, t in ipairs { a, b } do
		for k in pairs(t) do
			if not (k == "name" or k == "attr" or k == "tags" or k == "namespaces" or k == "last_add"
				or (math.type(k) == "integer" and k >= 1 and k <= #t)) then
				return path .. ": unexpected field " .. tostring(k)
			end
		end
		local n = 0
		for i = 1, #t do
			if type(t[i]) == "table" then
				n = n + 1
				if rawequal(t.tags[n], t[i]) == false then return path .. ": tags[" .. n .. "] is not child " .. i end
			elseif type(t[i]) ~= "string" then
				return path .. ": child " .. i .. " is a " .. type(t[i])
			end
		end
		if #t.tags ~= n then return path .. ": " .. #t.tags .. " tags for " .. n .. " element children" end
	end
	for k, v in pairs(a.attr) do
		if b.attr[k] ~= v then return path .. ": attr " .. k .. " = " .. tostring(b.attr[k]) .. ", not " .. v end
	end
	for k, v in pairs(b.attr) do
		if a.attr[k] == nil then return path .. ": missing attr " .. k .. " = " .. v end
	end
	local ca, cb = merged_children(a), merged_children(b)
	if #ca ~= #cb then return path .. ": " .. #ca .. " children, not " .. #cb end
	for i = 1, #ca do
		if type(ca[i]) ~= type(cb[i]) then return path .. ": child " .. i .. " type" end
		if type(ca[i]) == "string" then
			if ca[i] ~= cb[i] then return path .. ": text " .. i .. " " .. ("%q"):format(ca[i]) end
		else
			local d = tree_diff(ca[i], cb[i], path)
			if d then return d end
		end
	end
	return nil
end

-- core.parse(s) must be util.xml.parse(s), as a tree and as tostring writes it.
local function same_as_util_xml(s, what)
	local got = parse(s)
	lu.assertNotNil(got, what .. ": core.parse refused " .. s)
	local want = assert(xml_parse(s))
	lu.assertNil(tree_diff(got, want), what .. ": " .. s)
	lu.assertEquals(tostring(got), tostring(want), what)
	return got
end

TestParse = {}

function TestParse:test_fixed_cases()
	local m = same_as_util_xml("<message id='a&apos;b&quot;c&lt;d&gt;e&amp;f'>"
		.. "<body>x &lt; y &amp; &apos;z&apos; &gt; &quot;w&quot;</body></message>", "the five escapes")
	lu.assertEquals(m.attr.id, "a'b\"c<d>e&f")
	lu.assertEquals(m:get_child_text("body"), "x < y & 'z' > \"w\"")
	m = same_as_util_xml([[<a b='"x"'>it's</a>]], "raw quotes that need no escape")
	lu.assertEquals(m.attr.b, '"x"')

	m = same_as_util_xml("<message xmlns='jabber:client' to='bob@example.org'><body>hi</body>"
		.. "<x xmlns='urn:a'><y/><z xmlns='urn:b'><w/></z></x><n xmlns=''><v/></n></message>",
		"nested namespaces")
	lu.assertEquals(m.attr.xmlns, "jabber:client")
	lu.assertEquals(m.tags[1].attr.xmlns, "jabber:client", "inherited")
	local x = m.tags[2]
	lu.assertEquals({ x.attr.xmlns, x.tags[1].attr.xmlns, x.tags[2].attr.xmlns, x.tags[2].tags[1].attr.xmlns },
		{ "urn:a", "urn:a", "urn:b", "urn:b" })
	lu.assertEquals(m.tags[3].attr, {}, "xmlns='' leaves no namespace")
	lu.assertEquals(m.tags[3].tags[1].attr, {})

	m = same_as_util_xml("<message xml:lang='en' to='b'><body xml:lang='de'>x</body></message>", "xml:lang")
	lu.assertEquals(m.attr, { ["xml:lang"] = "en", to = "b" })
	lu.assertEquals(m.tags[1].attr["xml:lang"], "de")

	m = same_as_util_xml("<a/>", "an empty element")
	lu.assertEquals({ #m, #m.tags, next(m.attr) }, { 0, 0, nil })
	lu.assertEquals(tostring(same_as_util_xml("<a></a>", "start and end tag")), "<a/>")

	m = same_as_util_xml("<a>t1<b/>t2<c>t3</c><d/>t4</a>", "text and elements mixed")
	lu.assertEquals({ m[1], m[2].name, m[3], m[4].name, m[5].name, m[6] }, { "t1", "b", "t2", "c", "d", "t4" })
	lu.assertEquals({ m.tags[1].name, m.tags[2].name, m.tags[3].name }, { "b", "c", "d" })

	local utf8_text = "é ✓ \u{7F}\u{85}\u{D7FF}\u{E000}\u{FFFD}\u{10000}\u{10FFFF}\t\n"
	m = same_as_util_xml("<a b='é✓\u{10FFFF}'>" .. utf8_text .. "</a>", "UTF-8")
	lu.assertEquals({ m.attr.b, m[1] }, { "é✓\u{10FFFF}", utf8_text })

	same_as_util_xml("<a.b _x='1' a-1='2' xmlfoo='3'><_/><Z9/><xmlns/></a.b>", "the ASCII name characters")

	-- What delivery does: a delay appended to the parsed tree.
	local xml = "<message to='bob@example.org' type='chat'><body>hi</body></message>"
	local got, want = parse(xml), xml_parse(xml)
	for _, t in ipairs { got, want } do
		t:tag("delay", { xmlns = "urn:xmpp:delay", from = "example.org", stamp = "2023-11-14T22:13:20Z" })
			:text("Offline Storage"):up()
	end
	lu.assertNil(tree_diff(got, want))
	lu.assertEquals(tostring(got), tostring(want))
	lu.assertEquals(got.tags[2].attr.xmlns, "urn:xmpp:delay")
	lu.assertEquals(got:get_child_text("delay", "urn:xmpp:delay"), "Offline Storage")
end

function TestParse:test_depth_like_serialize()
	local ok = st.stanza("a")
	for _ = 1, 256 do ok:tag("a") end
	local s = serialize(ok)
	lu.assertNotNil(s)
	same_as_util_xml(s, "257 levels, as deep as serialize writes")
	lu.assertNil(parse("<a>" .. s .. "</a>"), "one more")
	lu.assertNotNil(xml_parse("<a>" .. s .. "</a>"), "util.xml reads it")
end

function TestParse:test_arguments()
	lu.assertErrorMsgContains("bad argument #1", core.parse, {}, stanza_mt)
	lu.assertErrorMsgContains("bad argument #2", core.parse, "<a/>")
end

-- Everything outside the subset is nil; `valid` says whether util.xml.parse (the
-- fallback) reads it, to show the case is refused for the reason given.
function TestParse:test_fallbacks()
	local cases = {
		{ "prefixed element", "<p:a xmlns:p='urn:p'/>", true },
		{ "xmlns: declaration", "<a xmlns:p='urn:p'/>", true },
		{ "prefixed attribute", "<a xmlns:p='urn:p' p:b='1'/>", true },
		{ "serializer's namespaced attribute", serialize(st.stanza("a", { ["urn:x\1k"] = "v" })), true },
		{ "unbound prefix", "<a p:b='1'/>", false },
		{ "xml:lang on an element name", "<xml:a/>", true },
		{ "comment", "<a><!-- c --></a>", false },
		{ "CDATA", "<a><![CDATA[x]]></a>", true },
		{ "processing instruction", "<a><?pi x?></a>", false },
		{ "processing instruction before", "<?pi x?><a/>", false },
		{ "XML declaration", "<?xml version='1.0'?><a/>", true },
		{ "DOCTYPE", "<!DOCTYPE a><a/>", false },
		{ "decimal character reference", "<a>&#65;</a>", true },
		{ "hex character reference", "<a>&#x41;</a>", true },
		{ "character reference in attribute", "<a b='&#65;'/>", true },
		{ "unknown entity", "<a>&nbsp;</a>", false },
		{ "entity without ;", "<a>&amp</a>", false },
		{ "raw &", "<a>x & y</a>", false },
		{ "raw & in attribute", "<a b='&'/>", false },
		{ "raw < in text", "<a>x<</a>", false },
		{ "raw < in attribute", "<a b='<'/>", false },
		{ "raw > in text", "<a>x>y</a>", true },
		{ "]]> in text", "<a>]]></a>", false },
		{ "raw > in attribute", "<a b='>'/>", true },
		{ "double-quoted attribute", '<a b="1"/>', true },
		{ "duplicate attribute", "<a b='1' b='2'/>", false },
		{ "duplicate xmlns", "<a xmlns='u' xmlns='u'/>", false },
		{ "duplicate xml:lang", "<a xml:lang='en' xml:lang='de'/>", false },
		{ "non-ASCII element name", "<é/>", true },
		{ "non-ASCII attribute name", "<a é='1'/>", true },
		{ "name starting with a digit", "<1a/>", false },
		{ "attribute name starting with -", "<a -b='1'/>", false },
		{ "name with a colon only", "<a:/>", false },
		{ "invalid UTF-8 byte", "<a>\xff</a>", false },
		{ "overlong UTF-8", "<a>\xc0\xaf</a>", false },
		{ "overlong 3-byte UTF-8", "<a>\xe0\x80\xaf</a>", false },
		{ "truncated UTF-8", "<a>\xe2\x9c</a>", false },
		{ "truncated UTF-8 at the end", "<a/>\xe2", false },
		{ "UTF-16 surrogate", "<a>\xed\xa0\x80</a>", false },
		{ "U+FFFE", "<a>\u{FFFE}</a>", false },
		{ "U+FFFF", "<a>\u{FFFF}</a>", false },
		{ "beyond U+10FFFF", "<a>\xf4\x90\x80\x80</a>", false },
		{ "invalid UTF-8 in attribute", "<a b='\xff'/>", false },
		{ "control character", "<a>\1</a>", false },
		{ "NUL", "<a>\0</a>", false },
		{ "control character in attribute", "<a b='\27'/>", false },
		{ "CR LF in text", "<a>x\r\ny</a>", true },
		{ "CR in text", "<a>x\ry</a>", true },
		{ "CR in attribute", "<a b='x\ry'/>", true },
		{ "tab in attribute", "<a b='x\ty'/>", true },
		{ "newline in attribute", "<a b='x\ny'/>", true },
		{ "mismatched end tag", "<a></b>", false },
		{ "crossed end tags", "<a><b></a></b>", false },
		{ "end tag with a space", "<a></a >", true },
		{ "end tag with a longer name", "<a></ab>", false },
		{ "end tag only", "</a>", false },
		{ "two top-level elements", "<a/><b/>", false },
		{ "space before", " <a/>", true },
		{ "space after", "<a/> ", true },
		{ "newline after", "<a/>\n", true },
		{ "text after", "<a/>x", false },
		{ "byte order mark", "\xEF\xBB\xBF<a/>", true },
		{ "two spaces between attributes", "<a  b='1'/>", true },
		{ "spaces around =", "<a b = '1'/>", true },
		{ "space before />", "<a />", true },
		{ "space before >", "<a b='1' ></a>", true },
		{ "tab before an attribute", "<a\tb='1'/>", true },
		{ "no space between attributes", "<a b='1'c='2'/>", false },
		{ "attribute without value", "<a b/>", false },
		{ "empty input", "", false },
		{ "text only", "x", false },
		{ "unclosed element", "<a>", false },
		{ "unclosed child", "<a><b></a>", false },
		{ "unclosed start tag", "<a", false },
		{ "unclosed attribute value", "<a b='1", false },
		{ "unclosed end tag", "<a></a", false },
		{ "xmlns bound to the XML namespace", "<a xmlns='http://www.w3.org/XML/1998/namespace'/>", false },
		{ "xmlns bound to the xmlns namespace", "<a xmlns='http://www.w3.org/2000/xmlns/'/>", false },
	}
	for _, c in ipairs(cases) do
		local what, s, valid = c[1], c[2], c[3]
		lu.assertNil(parse(s), what)
		local ok, t = pcall(xml_parse, s)
		lu.assertEquals(ok and t ~= nil, valid, what .. ": util.xml.parse")
	end
end

-- Random trees (names, attributes with xmlns and xml:lang, text that exercises
-- escaping and UTF-8) -> serialize -> core.parse, which must give util.xml.parse's tree.
local pieces = { "a", "é", "'", '"', "<", ">", "&", "&amp;", " ", "x y", "]]>", "✓", "1", "\u{10FFFF}", "\u{85}" }
local text_pieces = { "\t", "\n", table.unpack(pieces) } -- tab and newline are left alone in text only
local function random_text(from)
	local t = {}
	for i = 1, math.random(0, 6) do t[i] = from[math.random(#from)] end
	return table.concat(t)
end
local function random_tree(depth)
	local nss = { "jabber:client", "urn:a", "urn:b", "urn:xmpp:delay", "" }
	local attr = {}
	for _ = 1, math.random(0, 6) do
		local r = math.random(6)
		if r == 1 then attr.xmlns = nss[math.random(#nss)]
		elseif r == 2 then attr["xml:lang"] = random_text(pieces)
		else attr["k" .. math.random(9)] = random_text(pieces) end
	end
	local el = st.stanza(({ "message", "body", "delay", "x", "e", "a.b", "_x", "a-1" })[math.random(8)], attr)
	for _ = 1, math.random(0, depth > 4 and 0 or 4) do
		if math.random(2) == 1 then el:text(random_text(text_pieces)) else el:add_child(random_tree(depth + 1)) end
	end
	return el
end

local function spec_seed()
	return tonumber(os.getenv("XML_SPEC_SEED") or "") or os.time()
end

function TestParse:test_random_trees_read_as_util_xml()
	local seed = spec_seed()
	math.randomseed(seed)
	for i = 1, 2000 do
		local s = serialize(random_tree(0))
		same_as_util_xml(s, ("tree %d of seed %d"):format(i, seed))
	end
end

-- Serialized random trees with random bytes flipped, inserted or deleted: core.parse
-- either refuses or gives what util.xml.parse gives.
function TestParse:test_mutations_refused_or_read_as_util_xml()
	local seed = spec_seed()
	math.randomseed(seed)
	local interesting = "<>/='\"&;: \t\r\n!?-#xa\0\128\255\195\169"
	local function random_byte()
		local r = math.random(3)
		if r == 1 then return string.char(math.random(0, 255)) end
		if r == 2 then return string.char(math.random(97, 122)) end
		local i = math.random(#interesting)
		return interesting:sub(i, i)
	end
	local accepted = 0
	local cases = 4000
	for i = 1, cases do
		local s = serialize(random_tree(2))
		for _ = 1, math.random(3) do
			local pos, op = math.random(#s), math.random(3)
			if op == 1 then s = s:sub(1, pos - 1) .. random_byte() .. s:sub(pos + 1)
			elseif op == 2 then s = s:sub(1, pos - 1) .. random_byte() .. s:sub(pos)
			else s = s:sub(1, pos - 1) .. s:sub(pos + 1) end
		end
		local what = ("mutation %d of seed %d: %q"):format(i, seed, s)
		local got = parse(s)
		if got then
			accepted = accepted + 1
			local ok, want = pcall(xml_parse, s)
			lu.assertTrue(ok and want ~= nil, what .. ": util.xml.parse fails: " .. tostring(want))
			lu.assertNil(tree_diff(got, want), what)
			lu.assertEquals(tostring(got), tostring(want), what)
		end
	end
	-- Not vacuous: many mutations (inside text and values) keep the XML in the subset.
	lu.assertTrue(accepted > cases // 20, ("only %d of %d accepted, seed %d"):format(accepted, cases, seed))
end

-- core.delay(stanza, from, seconds, text): the delay element delivery appends,
-- the same tree and the same bytes as util.stanza's stanza:tag(...):text(...):up().
TestDelay = {}

local datetime = require "util.datetime"

local function lua_delay(t, from, secs, text)
	return t:tag("delay", { xmlns = "urn:xmpp:delay", from = from, stamp = datetime.datetime(secs) }):text(text):up()
end

function TestDelay:test_same_as_util_stanza()
	local cases = {
		{ "<message to='bob@example.org' type='chat' id='m1'><body>hi</body></message>", "example.org", 1700000001 },
		{ "<message><body>a</body><active xmlns='http://jabber.org/protocol/chatstates'/>"
			.. "<delay xmlns='urn:xmpp:delay' from='x' stamp='2001-01-01T00:00:00Z'/></message>", "exämple.org", 0 },
		{ "<message/>", "localhost", 253402300799 },
		{ "<iq type='get'>text<q/>more</iq>", "h", 86399 },
	}
	for i, c in ipairs(cases) do
		local got, want = parse(c[1]), parse(c[1])
		local children, tags = #got, #got.tags
		lu.assertTrue(rawequal(core.delay(got, c[2], c[3], "Offline Storage"), got), "returns the stanza")
		lua_delay(want, c[2], c[3], "Offline Storage")
		lu.assertNil(tree_diff(got, want), "case " .. i)
		lu.assertEquals(tostring(got), tostring(want), "case " .. i)
		lu.assertEquals({ #got, #got.tags }, { children + 1, tags + 1 }, "one child more")
		local d = got[#got]
		lu.assertTrue(rawequal(d, got.tags[#got.tags]), "the last child is the last tag")
		lu.assertEquals({ d.name, d.attr.xmlns, d.attr.from, d.attr.stamp, d[1] },
			{ "delay", "urn:xmpp:delay", c[2], datetime.datetime(c[3]), "Offline Storage" })
	end
	local t = parse("<message/>")
	core.delay(t, "h", 0, "x")
	lu.assertEquals(t.tags[1].attr.stamp, "1970-01-01T00:00:00Z")
	core.delay(t, "h", 253402300799, "x")
	lu.assertEquals(t.tags[2].attr.stamp, "9999-12-31T23:59:59Z")
end

-- Bad arguments raise and leave the stanza as it was.
function TestDelay:test_bad_arguments()
	local t = parse("<message><body>b</body></message>")
	local before = tostring(t)
	local cases = {
		{ "bad argument #1 .* %(table expected", "<message/>", "h", 1, "x" },
		{ "bad argument #1 .*no metatable", { name = "m", attr = {}, tags = {} }, "h", 1, "x" },
		{ "bad argument #1 .*no tags table", setmetatable({ name = "m", attr = {} }, stanza_mt), "h", 1, "x" },
		{ "bad argument #2 .*control character", t, "a\1b", 1, "x" },
		{ "bad argument #2 .*invalid UTF%-8", t, "\xff", 1, "x" },
		{ "bad argument #2 .*string expected", t, nil, 1, "x" },
		{ "bad argument #3 .*out of range", t, "h", -1, "x" },
		{ "bad argument #3 .*out of range", t, "h", 253402300800, "x" },
		{ "bad argument #3 .*no integer representation", t, "h", 1.5, "x" },
		{ "bad argument #4 .*control character", t, "h", 1, "a\0b" },
		{ "bad argument #4 .*invalid UTF%-8", t, "h", 1, "\xed\xa0\x80" }, -- a surrogate
	}
	for i, c in ipairs(cases) do
		local ok, err = pcall(core.delay, c[2], c[3], c[4], c[5])
		lu.assertFalse(ok, "case " .. i)
		lu.assertStrMatches(err, ".*" .. c[1] .. ".*", nil, nil, "case " .. i)
	end
	lu.assertEquals(tostring(t), before, "nothing appended")
	lu.assertEquals(#t.tags, 1)
end
