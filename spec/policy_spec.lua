-- offline_store.policy without a server: the table of what is stored, delay and expiry handling,
-- recipient resolution, delivery stanzas and the exact error stanzas of §5 and §6.
-- Run through spec/run.lua (it puts Prosody's libraries on the path).

local lu = require "luaunit"
local st = require "util.stanza"
local xml_parse = require "util.xml".parse
local datetime = require "util.datetime"
local policy = require "offline_store.policy"

local HOST, BOB = "example.org", "bob@example.org"
local NOW = 1700000000 * 1000000

local function msg(attr, build)
	local m = st.message(attr or { to = BOB, from = "alice@example.org/phone", type = "chat", id = "m1" })
	if build then build(m) else m:tag("body"):text("hello"):up() end
	return m
end

local function chat_state(m, extra)
	m:tag("composing", { xmlns = "http://jabber.org/protocol/chatstates" }):up()
	if extra then extra(m) end
end

TestClassify = {}

function TestClassify:test_spec_table()
	local c = policy.classify
	lu.assertEquals({ c(msg({ type = "error" })) }, { "drop", "error" })
	lu.assertEquals({ c(msg({ type = "headline" })) }, { "drop", "headline" })
	lu.assertEquals({ c(msg({ type = "groupchat" })) }, { "bounce", "groupchat" })
	lu.assertEquals({ c(msg({ type = "groupchat" }), true) }, { "store" })
	lu.assertEquals({ c(msg({ type = "chat" }, chat_state)) }, { "drop", "chatstate" })
	lu.assertEquals({ c(msg({ type = "chat" }, function(m)
		chat_state(m, function(x) x:tag("thread"):text("t1"):up() end) end)) }, { "drop", "chatstate" })
	lu.assertEquals({ c(msg({ type = "chat" }, function(m)
		chat_state(m, function(x) x:tag("origin-id", { xmlns = "urn:xmpp:sid:0", id = "o1" }):up() end) end)) },
		{ "drop", "chatstate" }, "ids carry no content")
	lu.assertEquals({ c(msg({ type = "chat" }, function(m)
		chat_state(m, function(x) x:tag("body"):text("hi"):up() end) end)) }, { "store" }, "a chat state with a body is stored")
	lu.assertEquals({ c(msg({ type = "chat" }, function(m)
		m:tag("body"):text("x"):up():tag("no-store", { xmlns = "urn:xmpp:hints" }):up() end)) }, { "drop", "no-store" })
	lu.assertEquals({ c(msg({ type = "chat" }, function(m)
		m:tag("body"):text("x"):up():tag("no-permanent-store", { xmlns = "urn:xmpp:hints" }):up() end)) }, { "drop", "no-store" })
	lu.assertEquals({ c(msg({ type = "chat" })) }, { "store" })
	lu.assertEquals({ c(msg({ type = "normal" })) }, { "store" })
	lu.assertEquals({ c(msg({})) }, { "store" }, "no type")
	lu.assertEquals({ c(msg({ type = "chat" }, function() end)) }, { "store" }, "empty message")
end

function TestClassify:test_store_hint_overrides_all_but_error()
	local function with_store(m) m:tag("store", { xmlns = "urn:xmpp:hints" }):up() end
	lu.assertEquals({ policy.classify(msg({ type = "chat" }, function(m) chat_state(m, with_store) end)) }, { "store" })
	lu.assertEquals({ policy.classify(msg({ type = "headline" }, with_store)) }, { "store" })
	lu.assertEquals({ policy.classify(msg({ type = "groupchat" }, with_store)) }, { "store" })
	lu.assertEquals({ policy.classify(msg({ type = "chat" }, function(m)
		with_store(m); m:tag("no-store", { xmlns = "urn:xmpp:hints" }):up() end)) }, { "store" })
	lu.assertEquals({ policy.classify(msg({ type = "error" }, with_store)) }, { "drop", "error" })
end

-- The bounce rule as the manual states it, one check at a time, against classify's single
-- pass: every message type, both groupchat settings, every set of up to three of
-- these children.
function TestClassify:test_single_pass_matches_the_rule()
	local HINTS, STATES = "urn:xmpp:hints", "http://jabber.org/protocol/chatstates"
	local function rule(m, store_groupchat)
		local t = m.attr.type
		if t == "error" then return "drop", "error" end
		if m:get_child("store", HINTS) then return "store" end
		if t == "headline" then return "drop", "headline" end
		if t == "groupchat" and not store_groupchat then return "bounce", "groupchat" end
		local states, other = 0, false
		for _, ch in ipairs(m.tags) do
			if ch.attr.xmlns == STATES then states = states + 1
			elseif not (ch.name == "thread" or ch.attr.xmlns == "urn:xmpp:sid:0") then other = true end
		end
		if states > 0 and not other then return "drop", "chatstate" end
		if m:get_child("no-store", HINTS) or m:get_child("no-permanent-store", HINTS) then return "drop", "no-store" end
		return "store"
	end
	local kids = {
		{ "body" }, { "thread" }, { "origin-id", "urn:xmpp:sid:0" }, { "composing", STATES },
		{ "active", STATES }, { "store", HINTS }, { "no-store", HINTS }, { "no-permanent-store", HINTS },
		{ "store", "urn:other" }, { "x", "jabber:x:expire" },
	}
	local n = 0
	local function check(set)
		for _, t in ipairs({ "chat", "normal", "headline", "groupchat", "error", false }) do
			for _, sg in ipairs({ false, true }) do
				local m = msg({ type = t or nil }, function(x)
					for _, k in ipairs(set) do x:tag(k[1], { xmlns = k[2] }):up() end
				end)
				lu.assertEquals({ policy.classify(m, sg) }, { rule(m, sg) }, tostring(m))
				n = n + 1
			end
		end
	end
	check({})
	for i = 1, #kids do
		check({ kids[i] })
		for j = i, #kids do
			check({ kids[i], kids[j] })
			for k = j, #kids do check({ kids[i], kids[j], kids[k] }) end
		end
	end
	lu.assertEquals(n, 12 * (1 + 10 + 55 + 220))
end

TestRecipient = {}

function TestRecipient:test_order_of_sources()
	local m = msg({ to = "carol@example.org/x" })
	lu.assertEquals(policy.recipient({ username = "dave", stanza = m, origin = { username = "erin" } }), "dave")
	lu.assertEquals(policy.recipient({ stanza = m, origin = { username = "erin" } }), "carol")
	lu.assertEquals(policy.recipient({ stanza = msg({}), origin = { username = "erin" } }), "erin")
	lu.assertEquals(policy.recipient({ stanza = msg({ to = "example.org" }) }), nil, "no localpart, no origin")
	lu.assertEquals(policy.recipient({ stanza = msg({}) }), nil)
end

TestPrepare = {}

local trusted = { [HOST] = true, [BOB] = true }

function TestPrepare:test_plain_message_gets_now_and_keeps_everything()
	local m = msg()
	local xml, ts, expire = policy.prepare(m, NOW, trusted)
	lu.assertEquals(ts, NOW)
	lu.assertNil(expire)
	local back = xml_parse(xml)
	lu.assertEquals(back.attr.id, "m1")
	lu.assertEquals(back.attr.from, "alice@example.org/phone")
	lu.assertEquals(back:get_child_text("body"), "hello")
end

function TestPrepare:test_every_delay_is_removed_and_only_trusted_stamps_count()
	local m = msg(nil, function(x)
		x:tag("body"):text("b"):up()
		x:tag("delay", { xmlns = "urn:xmpp:delay", from = "alice@example.org", stamp = "2001-01-01T00:00:00Z" }):up()
		x:tag("x", { xmlns = "jabber:x:delay", stamp = "20010101T00:00:00" }):up()
		x:tag("delay", { xmlns = "urn:xmpp:delay", stamp = "2002-01-01T00:00:00Z" }):up()
	end)
	local xml, ts = policy.prepare(m, NOW, trusted)
	lu.assertEquals(ts, NOW, "client-supplied stamps are never trusted")
	local back = xml_parse(xml)
	lu.assertNil(back:get_child("delay", "urn:xmpp:delay"))
	lu.assertNil(back:get_child("x", "jabber:x:delay"))
	lu.assertEquals(back:get_child_text("body"), "b")
	lu.assertNotNil(m:get_child("delay", "urn:xmpp:delay"), "the original stanza is not modified")
end

function TestPrepare:test_smacks_and_host_delays_are_trusted()
	local stamp = "2023-11-14T22:13:20Z" -- 1700000000
	for _, from in ipairs({ BOB, HOST }) do
		local m = msg(nil, function(x)
			x:tag("body"):text("b"):up()
			x:tag("delay", { xmlns = "urn:xmpp:delay", from = from, stamp = stamp }):up()
		end)
		local _, ts = policy.prepare(m, NOW + 999 * 1000000, trusted)
		lu.assertEquals(ts, datetime.parse(stamp) * 1000000, from)
		lu.assertEquals(policy.times(m, NOW + 999 * 1000000, nil), NOW + 999 * 1000000,
			"no trusted set (a message from anyone else): no stamp is believed, " .. from)
	end
	local legacy = msg(nil, function(x)
		x:tag("x", { xmlns = "jabber:x:delay", from = HOST, stamp = "20231114T22:13:20" }):up()
	end)
	local _, ts = policy.prepare(legacy, NOW + 5, trusted)
	lu.assertEquals(ts, NOW, "legacy stamp from the host")
	local garbled = msg(nil, function(x)
		x:tag("delay", { xmlns = "urn:xmpp:delay", from = HOST, stamp = "yesterday" }):up()
	end)
	lu.assertEquals(select(2, policy.prepare(garbled, NOW, trusted)), NOW, "an unparsable stamp falls back to now")
end

function TestPrepare:test_expiry()
	local function with_expire(seconds)
		return msg(nil, function(x)
			x:tag("body"):text("b"):up()
			x:tag("x", { xmlns = "jabber:x:expire", seconds = seconds }):up()
		end)
	end
	lu.assertEquals(select(3, policy.prepare(with_expire("60"), NOW, trusted)), NOW + 60 * 1000000)
	lu.assertNil(select(3, policy.prepare(with_expire("0"), NOW, trusted)))
	lu.assertNil(select(3, policy.prepare(with_expire("-5"), NOW, trusted)))
	lu.assertNil(select(3, policy.prepare(with_expire("1.5"), NOW, trusted)))
	lu.assertNil(select(3, policy.prepare(with_expire("soon"), NOW, trusted)))
	local xml = policy.prepare(with_expire("60"), NOW, trusted)
	lu.assertNotNil(xml_parse(xml):get_child("x", "jabber:x:expire"), "the expire element is kept")
end

TestDelivery = {}

function TestDelivery:test_exactly_one_delay_from_host_with_stored_time()
	local xml = policy.prepare(msg(nil, function(x)
		x:tag("body"):text("b"):up()
		x:tag("delay", { xmlns = "urn:xmpp:delay", from = BOB, stamp = "2023-11-14T22:13:20Z" }):up()
	end), NOW, trusted)
	local out = policy.delivery({ xml = xml, ts = NOW + 1500000 }, HOST)
	local delays = {}
	for d in out:childtags("delay", "urn:xmpp:delay") do delays[#delays + 1] = d end
	lu.assertEquals(#delays, 1)
	lu.assertEquals(delays[1].attr.from, HOST)
	lu.assertEquals(delays[1].attr.stamp, "2023-11-14T22:13:21Z")
	lu.assertEquals(delays[1]:get_text(), "Offline Storage")
	lu.assertEquals(out:get_child_text("body"), "b")
end

-- Rows in core.parse's subset (what core.serialize writes) and rows outside it (read
-- by util.xml.parse) give the stanza util.xml.parse gave before core.parse existed.
function TestDelivery:test_same_stanza_with_or_without_core_parse()
	local parse = require "offline_store.core".parse
	local mt = getmetatable(st.stanza("x"))
	local stored = policy.prepare(msg(nil, function(x)
		x:tag("body"):text("it's <b> & é"):up()
		x:tag("active", { xmlns = "http://jabber.org/protocol/chatstates" }):up()
		x:tag("origin-id", { xmlns = "urn:xmpp:sid:0", id = "o1" }):up()
	end), NOW, trusted)
	local rows = {
		{ stored, true },
		{ stored:gsub("'", '"'), false }, -- double quotes: util.xml reads it
		{ stored:gsub("<body>", "<!-- --><body>"), false }, -- util.xml refuses comments: no stanza
	}
	for i, row in ipairs(rows) do
		local xml, in_subset = row[1], row[2]
		lu.assertEquals(parse(xml, mt) ~= nil, in_subset, "row " .. i)
		local item = { xml = xml, ts = NOW + 1500000 }
		local before, before_err = xml_parse(xml)
		if before then
			before:tag("delay", { xmlns = "urn:xmpp:delay", from = HOST, stamp = "2023-11-14T22:13:21Z" })
				:text(policy.DELAY_TEXT):up()
			lu.assertEquals(tostring(policy.delivery(item, HOST)), tostring(before), "row " .. i)
		else
			local out, err = policy.delivery(item, HOST)
			lu.assertNil(out, "row " .. i)
			lu.assertEquals(err, before_err, "row " .. i)
		end
	end
	lu.assertStrContains(tostring(policy.delivery({ xml = stored, ts = NOW }, HOST)), "it&apos;s &lt;b&gt; &amp; é")
end

-- A stamp outside what XEP-0082 writes (a row from another writer, or a forged
-- delay believed on a re-queue) is clamped: a delivery never fails after the pop.
function TestDelivery:test_out_of_range_times_clamped()
	local xml = "<message><body>b</body></message>"
	local function stamp(ts) return policy.delivery({ xml = xml, ts = ts }, HOST):get_child("delay", "urn:xmpp:delay").attr.stamp end
	lu.assertEquals(stamp(-62135596800 * 1000000), "1970-01-01T00:00:00Z", "year 1")
	lu.assertEquals(stamp(-1), "1970-01-01T00:00:00Z", "a microsecond before 1970")
	lu.assertEquals(stamp(math.maxinteger), "9999-12-31T23:59:59Z")
	lu.assertEquals(stamp(253402300799 * 1000000 + 999999), "9999-12-31T23:59:59Z")
	lu.assertEquals(stamp(1700000001 * 1000000 + 999999), "2023-11-14T22:13:21Z", "seconds, rounded down")
end

function TestDelivery:test_unparsable_row()
	local out, err = policy.delivery({ xml = "<message><body>", ts = NOW }, HOST)
	lu.assertNil(out)
	lu.assertIsString(err)
end

-- What Prosody's stream parser builds from the network: a namespaced attribute keeps
-- its "URI\1name" key whatever the URI holds, and xml:NAME other than lang, space,
-- base and id stays "XML-namespace\1NAME". Stored and delivered, the stanza has the
-- same attributes (xml:NAME written as such), and what Prosody writes for it is XML
-- that expat reads back to them.
local NS_XML = "http://www.w3.org/XML/1998/namespace"

local function odd_message(build)
	local m = msg()
	m.attr["urn:a b\1x"] = "1"
	m.attr["urn:q'\"<>& z\1y"] = "v'<&>\""
	m.attr[NS_XML .. "\1foo"] = "bar"
	m.attr["xml:lang"] = "en"
	m:tag("x", { xmlns = "urn:example:x" })
	m.tags[#m.tags].attr[NS_XML .. "\1other"] = "o"
	if build then build(m) end
	m:reset()
	return m
end

local function reparsed_by_expat(stanza)
	local attrs = {}
	local parser = require "lxp".new({ StartElement = function(_, name, attr)
		local copy = {}
		for _, k in ipairs(attr) do copy[k] = attr[k] end
		attrs[#attrs + 1] = { name = name, attr = copy }
	end }, "\1")
	local ok, err = parser:parse(tostring(stanza))
	if ok then ok, err = parser:parse() end
	lu.assertNotNil(ok, "what Prosody writes is well-formed: " .. tostring(err))
	return attrs
end

local function check_odd(out)
	lu.assertEquals(out.attr["urn:a b\1x"], "1")
	lu.assertEquals(out.attr["urn:q'\"<>& z\1y"], "v'<&>\"")
	lu.assertEquals(out.attr["xml:foo"], "bar")
	lu.assertEquals(out.attr["xml:lang"], "en")
	lu.assertEquals(out:get_child("x", "urn:example:x").attr["xml:other"], "o")
	lu.assertEquals(out:get_child_text("body"), "hello")
	lu.assertEquals(#out:get_child("delay", "urn:xmpp:delay"), 1)
	local seen = reparsed_by_expat(out)
	lu.assertEquals(seen[1].attr["urn:a b\1x"], "1")
	lu.assertEquals(seen[1].attr["urn:q'\"<>& z\1y"], "v'<&>\"")
	lu.assertEquals(seen[1].attr[NS_XML .. "\1foo"], "bar")
	lu.assertEquals(seen[1].attr[NS_XML .. "\1lang"], "en")
	lu.assertEquals(seen[3].attr[NS_XML .. "\1other"], "o")
end

function TestDelivery:test_odd_attributes_round_trip()
	local m = odd_message()
	local xml = policy.stored_xml(m)
	lu.assertEquals(xml, tostring(m), "stored as tostring writes it")
	check_odd(assert(policy.delivery({ xml = xml, ts = NOW }, HOST)))
end

-- Deeper than core.parse goes: read by the Lua reader, with the same result.
function TestDelivery:test_odd_attributes_in_a_deep_tree()
	local m = odd_message(function(x)
		for _ = 1, 300 do x:tag("deep") end
		x.last_add[#x.last_add].attr["urn:a b\1deep"] = "d"
	end)
	local out = assert(policy.delivery({ xml = policy.stored_xml(m), ts = NOW }, HOST))
	check_odd(out)
	local el, depth = out:get_child("x", "urn:example:x").tags[1], 1
	while el.tags[1] do el, depth = el.tags[1], depth + 1 end
	lu.assertEquals(depth, 300)
	lu.assertEquals(el.attr["urn:a b\1deep"], "d")
end

-- Whatever a row holds, turning it into a stanza returns a stanza or nil and an
-- error: it never raises.
function TestDelivery:test_never_raises()
	local rows = { "", "<", "<m", "<m>", "<m/><n/>", "<!DOCTYPE m><m/>", "<m><!-- c --></m>", "<?pi?><m/>",
		"<m xmlns:p='urn:a b' p:x='1' p:x='2'/>", "<m xmlns:ns1='http://www.w3.org/XML/1998/namespace' ns1:a='1'",
		"<m a='\1'/>", "<m>\255\254</m>", "<p:m/>", "<m xmlns:p=''/>", ("<a>"):rep(5000) }
	for i, xml in ipairs(rows) do
		local ok, out, err = pcall(policy.delivery, { xml = xml, ts = NOW }, HOST)
		lu.assertTrue(ok, "row " .. i .. " raised: " .. tostring(out))
		lu.assertNil(out, "row " .. i)
		lu.assertIsString(err, "row " .. i)
	end
end

TestErrors = {}

local function check_error(reply, etype, code, condition, text)
	lu.assertEquals(reply.name, "message")
	lu.assertEquals(reply.attr.type, "error")
	lu.assertEquals(reply.attr.from, BOB)
	lu.assertEquals(reply.attr.to, "alice@example.org/phone")
	lu.assertEquals(reply.attr.id, "m1")
	lu.assertEquals(reply:get_child_text("body"), "hello", "original children kept")
	local e = reply:get_child("error")
	lu.assertEquals(e.attr.type, etype)
	lu.assertEquals(e.attr.code, code)
	lu.assertNotNil(e:get_child(condition, "urn:ietf:params:xml:ns:xmpp-stanzas"))
	lu.assertEquals(e:get_child_text("text", "urn:ietf:params:xml:ns:xmpp-stanzas"), text)
end

function TestErrors:test_limit()
	check_error(policy.limit_error(msg()), "wait", "500", "resource-constraint",
		"Your contact offline message queue is full. The message has been discarded.")
end

function TestErrors:test_bounce()
	check_error(policy.bounce_error(msg()), "cancel", "503", "service-unavailable", "Bounce offline message")
end

function TestErrors:test_failure()
	local reply = policy.failure_error(msg())
	check_error(reply, "wait", "500", "internal-server-error", policy.FAILURE_TEXT)
	lu.assertStrContains(policy.FAILURE_TEXT, "not stored")
end
