-- offline_store.policy: which messages are stored, with which timestamp and expiry,
-- what a delivered message looks like, and the error stanzas.
-- Host-agnostic: it works on util.stanza objects and takes the host and time as
-- arguments, so it is unit-tested without a server.

local st = require "util.stanza"
local lxp = require "lxp"
local datetime = require "util.datetime"
local jid_split = require "util.jid".split

local tonumber, floor, tostring, ipairs, getmetatable, setmetatable =
	tonumber, math.floor, tostring, ipairs, getmetatable, setmetatable
local require = require

local _ENV = nil
-- luacheck: std none

local M = {}

local NS_DELAY, NS_LEGACY_DELAY = "urn:xmpp:delay", "jabber:x:delay"
local NS_HINTS = "urn:xmpp:hints"
local NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
local NS_EXPIRE = "jabber:x:expire"
local NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
local NS_SID = "urn:xmpp:sid:0"

M.LIMIT_TEXT = "Your contact offline message queue is full. The message has been discarded."
M.BOUNCE_TEXT = "Bounce offline message"
M.FAILURE_TEXT = "The message was not stored: the offline message store failed. Please try again later."
M.DELAY_TEXT = "Offline Storage"

-- (stanza:childtags() without a namespace yields only children in the parent's
-- namespace, so the loops below walk stanza.tags.)

-- Decides what to do with a message offered for offline storage.
-- Returns "store", or "drop", reason (no reply), or "bounce", reason (503 to the sender).
-- One pass over the children (this runs for every message): the XEP-0334 hints, and
-- whether the message carries nothing but chat state (XEP-0085), optionally a
-- <thread/>, and ids that carry no content (XEP-0359 stanza-id/origin-id, which
-- servers and clients add to every message).
function M.classify(stanza, store_groupchat)
	local t = stanza.attr.type
	if t == "error" then return "drop", "error" end
	local store_hint, no_store, states, content = false, false, 0, false
	for _, child in ipairs(stanza.tags) do
		local ns, name = child.attr.xmlns, child.name
		if ns == NS_CHATSTATES then
			states = states + 1
		else
			if ns == NS_HINTS then
				if name == "store" then
					store_hint = true
				elseif name == "no-store" or name == "no-permanent-store" then
					no_store = true
				end
			end
			if not (name == "thread" or ns == NS_SID) then content = true end
		end
	end
	if store_hint then return "store" end
	if t == "headline" then return "drop", "headline" end
	if t == "groupchat" and not store_groupchat then return "bounce", "groupchat" end
	if states > 0 and not content then return "drop", "chatstate" end
	if no_store then return "drop", "no-store" end
	return "store"
end

-- The recipient's username: event.username, else the localpart of
-- `to`, else the username of the session the event came from.
function M.recipient(event)
	if event.username then return event.username end
	local to = event.stanza and event.stanza.attr.to
	local node = to and jid_split(to)
	if node then return node end
	return event.origin and event.origin.username
end

local function is_delay(child)
	local ns = child.attr.xmlns
	return (child.name == "delay" and ns == NS_DELAY) or (child.name == "x" and ns == NS_LEGACY_DELAY)
end

-- Parses a XEP-0203 or legacy XEP-0091 stamp; integer seconds or nil.
local function parse_stamp(child)
	local stamp = child.attr.stamp
	if not stamp then return nil end
	if child.attr.xmlns == NS_LEGACY_DELAY then
		-- CCYYMMDDThh:mm:ss, always UTC
		local y, mo, d, rest = stamp:match("^(%d%d%d%d)(%d%d)(%d%d)(T%d%d:%d%d:%d%d)$")
		if not y then return nil end
		stamp = y .. "-" .. mo .. "-" .. d .. rest .. "Z"
	end
	return datetime.parse(stamp)
end

-- core.serialize writes the stored XML in C without a copy; a tree too deep
-- for it takes the Lua way, a stripped copy through tostring.
local core = require "offline_store.core"
local serialize = core.serialize
local function strip_and_serialize(stanza)
	local copy = st.clone(stanza)
	copy:maptags(function(child)
		if is_delay(child) then return nil end
		return child
	end)
	return tostring(copy)
end

-- The XML to store for a message: byte for byte what tostring gives, without
-- the top-level delays. (db:store takes the stanza itself and writes the same in
-- C; this is for what it cannot write, a tree too deep, and for tests.)
function M.stored_xml(stanza)
	return serialize(stanza, true) or strip_and_serialize(stanza)
end

-- The timestamp (µs) and expiry (µs or nil) of a message offered for storage.
-- `trusted` is a set of JIDs whose delay stamps are believed (this host, the
-- recipient's bare JID: mod_smacks re-queues with those), or nil for none: a
-- sender can forge any stamp.
-- (One pass over the children: this runs for every message stored.)
function M.times(stanza, now_us, trusted)
	local ts, x
	local tags = stanza.tags
	for i = 1, #tags do
		local child = tags[i]
		local ns = child.attr.xmlns
		if ns == NS_EXPIRE then
			if not x and child.name == "x" then x = child end
		elseif trusted and not ts and is_delay(child) and trusted[child.attr.from or ""] then
			local secs = parse_stamp(child)
			if secs then ts = floor(secs) * 1000000 end
		end
	end
	ts = ts or now_us
	local expire
	local seconds = x and x.attr.seconds
	if seconds and seconds:match("^%d+$") then
		seconds = tonumber(seconds)
		if seconds > 0 then expire = ts + seconds * 1000000 end
	end
	return ts, expire
end

-- Both: the XML to store, the timestamp and the expiry.
function M.prepare(stanza, now_us, trusted)
	local ts, expire = M.times(stanza, now_us, trusted)
	return M.stored_xml(stanza), ts, expire
end

-- The stored XML is what core.serialize wrote: core.parse reads that subset in
-- C, into the tree util.xml.parse would give; it returns nil for anything else
-- (rows from other writers, trees too deep for C, namespaced attributes, tabs or
-- newlines in attribute values), which read_xml below then reads.
local parse, add_delay = core.parse, core.delay
local stanza_mt = getmetatable(st.stanza("x"))
local STAMP_MAX = 253402300799 -- 9999-12-31T23:59:59Z: the last stamp with a four-digit year

local NS_XML = "http://www.w3.org/XML/1998/namespace"
local XML_NS_KEY = NS_XML .. "\1" -- the start of an xml:NAME attribute's key from expat
-- What tostring (and core.serialize) writes for such a key, which expat refuses
-- (only the prefix xml may name that namespace), and what it means.
local XML_NS_DECL = " xmlns:(ns%d+)='http://www%.w3%.org/XML/1998/namespace' %1:"
local XML_NS_DECL_PLAIN = "='" .. NS_XML .. "' "

local function stop(parser) parser:stop() end

-- The tree util.xml.parse gives, without its stanza:tag checks, and built the
-- way Prosody's stream parser builds a stanza from the network: a namespaced
-- attribute keeps its "URI\1name" key whatever the URI holds (util.stanza's
-- name check would refuse a URI with a space, a quote, <, > or &, which the
-- stream accepted), and every attribute in the XML namespace becomes xml:NAME.
-- Returns the tree, or nil and util.xml's error text. Never raises.
local function read_xml(xml)
	local top, open, depth = nil, {}, 0
	local handler = { StartDoctypeDecl = stop, Comment = stop, ProcessingInstruction = stop }
	function handler.StartElement(_, tagname, attr)
		local ns, name = tagname:match("^([^\1]*)\1(.*)$")
		if not ns then
			name = tagname
		elseif ns ~= "" then
			attr.xmlns = ns
		end
		for i = 1, #attr do
			local k = attr[i]
			attr[i] = nil
			if k:sub(1, #XML_NS_KEY) == XML_NS_KEY then
				attr["xml:" .. k:sub(#XML_NS_KEY + 1)] = attr[k]
				attr[k] = nil
			end
		end
		local el = setmetatable({ name = name, attr = attr, tags = {} }, stanza_mt)
		local parent = open[depth]
		if parent then
			parent[#parent + 1] = el
			parent.tags[#parent.tags + 1] = el
		else
			top = el
		end
		depth = depth + 1
		open[depth] = el
	end
	function handler.CharacterData(_, data)
		local el = open[depth]
		el[#el + 1] = data
	end
	function handler.EndElement()
		open[depth] = nil
		depth = depth - 1
	end
	local parser = lxp.new(handler, "\1")
	local ok, err, line, col = parser:parse(xml)
	if ok then ok, err, line, col = parser:parse() end
	if ok and top then return top end
	return nil, ("%s (line %d, col %d))"):format(tostring(err), line or 0, col or 0)
end

-- The stanza a stored row holds: core.parse for what it reads, else read_xml;
-- a row with xml:NAME attributes (other than those Prosody's stream parser
-- names itself, e.g. xml:lang) was written with a prefix bound to the XML
-- namespace, which read_xml reads once that is written as xml: again (only
-- markup holds quotes unescaped, so the pattern matches nothing else; and
-- only XML that expat refused is rewritten).
local function stanza_of(xml)
	local stanza = parse(xml, stanza_mt)
	if stanza then return stanza end
	local err
	stanza, err = read_xml(xml)
	if not stanza and xml:find(XML_NS_DECL_PLAIN, 1, true) then
		local rewritten, n = xml:gsub(XML_NS_DECL, " xml:")
		if n > 0 then stanza = read_xml(rewritten) end
	end
	return stanza, err
end
M.stanza_of = stanza_of -- (a stored row's stanza without a delay: offline_store.migrate's export)

-- Turns a stored item back into a stanza ready to send: exactly one delay,
-- from the host, stamped with the storage time. Returns nil, error if the
-- stored XML no longer parses. (core.delay adds the element stanza:tag would,
-- without util.stanza's checks of the host, the stamp and the text on every
-- delivered message.)
function M.delivery(item, host)
	local stanza, err = stanza_of(item.xml)
	if not stanza then return nil, err end
	-- (a stamp core.delay cannot write, from a forged or foreign row, is clamped:
	-- a delivery must not fail after the pop)
	local secs = item.ts // 1000000
	if secs < 0 then secs = 0 elseif secs > STAMP_MAX then secs = STAMP_MAX end
	return add_delay(stanza, host, secs, M.DELAY_TEXT)
end

-- An error reply that keeps the original's id and children (as MongooseIM and
-- ejabberd do), from the original recipient to the original sender.
local function error_reply(stanza, etype, code, condition, text)
	local reply = st.clone(stanza)
	reply.attr.from, reply.attr.to = stanza.attr.to, stanza.attr.from
	reply.attr.type = "error"
	reply:tag("error", { type = etype, code = code })
		:tag(condition, { xmlns = NS_STANZAS }):up()
		:tag("text", { xmlns = NS_STANZAS }):text(text):up()
	:up()
	return reply
end

-- The recipient's queue is full.
function M.limit_error(stanza)
	return error_reply(stanza, "wait", "500", "resource-constraint", M.LIMIT_TEXT)
end

-- The store failed; nothing was stored.
function M.failure_error(stanza)
	return error_reply(stanza, "wait", "500", "internal-server-error", M.FAILURE_TEXT)
end

-- Declined where RFC 6121 says to bounce.
function M.bounce_error(stanza)
	return error_reply(stanza, "cancel", "503", "service-unavailable", M.BOUNCE_TEXT)
end

return M
