-- bench/xml.lua: reading and writing a stored message, util.stanza/util.xml
-- (what deliveries and stores did in Lua) against core.parse/core.serialize.
--
--   make bench-xml            (or: lua5.4 bench/xml.lua, from the repository root)
--
-- A typical one-to-one chat message (a 100-byte body, an origin-id and a chat
-- state) is parsed and serialized many times per repetition; every repetition
-- runs the four loops one after the other, so drifts of the machine's speed hit
-- them alike. Prints the median over 7 repetitions of the process CPU time per
-- call (os.clock, garbage collection included), with the spread (half of max -
-- min, relative to the median), and how many times faster C is.

package.path = "lua/?.lua;/usr/lib/prosody/?.lua;" .. package.path
package.cpath = "build/?.so;" .. package.cpath .. ";/usr/lib/prosody/?.so"
local st = require "util.stanza"
local xml_parse = require "util.xml".parse
local core = require "offline_store.core"

local REPS = 7
local REP_SECONDS = 0.2 -- CPU time of one loop in one repetition

local message = st.message({ from = "alice@example.org/phone", to = "bob@example.org", type = "chat",
		id = "5c3b1d7e-0a41" })
	:tag("body"):text(("Are we still on for lunch tomorrow? I can book the table at noon if you like it. "):sub(1, 100)):up()
	:tag("origin-id", { xmlns = "urn:xmpp:sid:0", id = "5c3b1d7e-0a41" }):up()
	:tag("active", { xmlns = "http://jabber.org/protocol/chatstates" }):up()
local xml = core.serialize(message)
local stanza_mt = getmetatable(message)
local parsed = core.parse(xml, stanza_mt)
assert(parsed and tostring(parsed) == tostring(xml_parse(xml)), "core.parse differs from util.xml.parse")
assert(xml == tostring(message))

local loops = {
	{ "util.xml.parse", function() return xml_parse(xml) end },
	{ "core.parse", function() return core.parse(xml, stanza_mt) end },
	{ "tostring", function() return tostring(message) end },
	{ "core.serialize", function() return core.serialize(message) end },
}

-- CPU seconds of n calls.
local function time(fn, n)
	collectgarbage("collect")
	local t0 = os.clock()
	for _ = 1, n do fn() end
	return os.clock() - t0
end

-- The number of calls that takes about REP_SECONDS.
local function calibrate(fn)
	local n = 100
	while true do
		local t = time(fn, n)
		if t >= REP_SECONDS / 4 then return math.max(1, math.floor(n * REP_SECONDS / t)) end
		n = n * 4
	end
end

local function median(t)
	local s = { table.unpack(t) }
	table.sort(s)
	return s[(#s + 1) // 2]
end

local us = {}
for i, l in ipairs(loops) do
	l.n = calibrate(l[2])
	us[i] = {}
end
for _ = 1, REPS do
	for i, l in ipairs(loops) do
		us[i][#us[i] + 1] = time(l[2], l.n) / l.n * 1e6
	end
end

print(("message: %d bytes (body 100), %d repetitions, CPU time per call"):format(#xml, REPS))
local med = {}
for i, l in ipairs(loops) do
	local m = median(us[i])
	med[i] = m
	local lo, hi = math.min(table.unpack(us[i])), math.max(table.unpack(us[i]))
	print(("  %-15s %8.2f us  +-%2.0f%%  (%d calls per repetition)"):format(l[1], m, (hi - lo) / 2 / m * 100, l.n))
end
print(("  parse:     core.parse is %.1f times as fast as util.xml.parse"):format(med[1] / med[2]))
print(("  serialize: core.serialize is %.1f times as fast as tostring"):format(med[3] / med[4]))
