-- offline_store.flexible: XEP-0013 Flexible Offline Message Retrieval (version 1.3) over
-- the core's store: the number of messages and their headers (service discovery on the node
-- http://jabber.org/protocol/offline of the account), viewing, removing, fetching and
-- purging them with <offline/> iqs, and the rule that a session that asked for any of this
-- is not flooded at its initial presence.
--
-- A message's node is "<row id, 16 hex digits>-<storage time in µs, hex>": opaque to
-- clients, stable across a restart and across PostgreSQL nodes (both come from the row),
-- in arrival order under dictionary ordering (which the XEP allows clients to use), and
-- never naming another message if a row id were used again (the time must match too).
--
-- Host-agnostic, as offline_store.drain: the plugin passes what touches Prosody in `cfg`
-- and calls the methods from its event handlers:
--
--   local f = flexible.new { host =, db = f() -> db | nil, err,  now_us = f(),
--       deliver = f(item) -> stanza | nil, why,   later = f(seconds, fn),
--       sessions = f(username) -> { [resource] = session } | nil,   page =, log = f(level, fmt, ...) }
--   f:info_node(event)     account-disco-info-node: the count; true when answered
--   f:items_node(event)    account-disco-items-node: the headers; true when answered
--   f:query(event)         iq/bare/...offline:offline: view, remove, fetch, purge
--   f:holds_flood(session) message/offline/broadcast: true when this login is not flooded
--   f:is_copy(session, stanza)  a view/fetch copy of a row coming back from mod_smacks
--   flexible.node_of(item), flexible.parse_node(node), flexible.parse(stanza)

local st = require "util.stanza"
local jid_split = require "util.jid".split

local ipairs, pairs, tonumber, tostring, type, pcall, setmetatable = ipairs, pairs, tonumber, tostring, type, pcall, setmetatable
local format = string.format

local _ENV = nil
-- luacheck: std none

local M = {}

M.NS = "http://jabber.org/protocol/offline"
local NS = M.NS
local NS_DATA = "jabber:x:data"
local NS_DELAY = "urn:xmpp:delay"
M.PAGE = 500 -- rows read at a time for the headers and a fetch

--- Node ids.

function M.node_of(item)
	return format("%016x-%x", item.id, item.ts)
end

-- The row id and storage time a node names, or nil for anything we did not write.
function M.parse_node(node)
	if type(node) ~= "string" then return nil end
	local id, ts = node:match("^(%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x)%-(%x+)$")
	if not id or #ts > 16 then return nil end
	id, ts = tonumber(id, 16), tonumber(ts, 16)
	if id <= 0 or ts < 0 then return nil end
	return id, ts
end

--- Requests.

-- Parses the <offline/> payload of an iq. Returns a request
--   { kind = "fetch" } | { kind = "purge" } | { kind = "items", items = { { action =, node = }, ... } }
-- or nil, condition, text for a request the XEP does not define (bad-request).
-- Choices where the XEP is vague (as ejabberd): a request is a fetch, a purge or a list of
-- items, never a mix; removing and purging change the queue, so they need an iq of type set;
-- viewing and fetching read it, and are taken in a get (the XEP's examples) or a set (some
-- clients send one).
function M.parse(stanza)
	local iq_type = stanza.attr.type
	local offline = stanza.tags[1]
	if not offline or offline.name ~= "offline" or offline.attr.xmlns ~= NS then
		return nil, "bad-request", "expected an <offline/> element"
	end
	local fetch, purge, items = 0, 0, {}
	for _, child in ipairs(offline.tags) do
		if child.attr.xmlns ~= NS and child.attr.xmlns ~= nil then -- (nil: inherited, built in Lua)
			return nil, "bad-request", "unexpected element " .. tostring(child.name)
		elseif child.name == "fetch" then
			fetch = fetch + 1
		elseif child.name == "purge" then
			purge = purge + 1
		elseif child.name == "item" then
			local action, node = child.attr.action, child.attr.node
			if action ~= "view" and action ~= "remove" then
				return nil, "bad-request", "an item's action must be view or remove"
			end
			if type(node) ~= "string" or node == "" then
				return nil, "bad-request", "an item needs a node"
			end
			if action == "remove" and iq_type ~= "set" then
				return nil, "bad-request", "removing messages takes an iq of type set"
			end
			items[#items + 1] = { action = action, node = node }
		else
			return nil, "bad-request", "unexpected element " .. tostring(child.name)
		end
	end
	local kinds = (fetch > 0 and 1 or 0) + (purge > 0 and 1 or 0) + (#items > 0 and 1 or 0)
	if kinds ~= 1 or fetch > 1 or purge > 1 then
		return nil, "bad-request", "expected one <fetch/>, one <purge/> or items"
	end
	if purge > 0 then
		if iq_type ~= "set" then return nil, "bad-request", "purging takes an iq of type set" end
		return { kind = "purge" }
	end
	if fetch > 0 then return { kind = "fetch" } end
	return { kind = "items", items = items }
end

--- Answers.

-- The count: what the XEP's disco#info on the node carries (the reply has the query open).
function M.count_reply(reply, count)
	return reply
		:tag("identity", { category = "automation", type = "message-list" }):up()
		:tag("feature", { var = NS }):up()
		:tag("x", { xmlns = NS_DATA, type = "result" })
			:tag("field", { var = "FORM_TYPE", type = "hidden" }):text_tag("value", NS):up()
			:tag("field", { var = "number_of_messages" }):text_tag("value", tostring(count)):up()
		:up()
end

-- One header (the reply has the disco#items query open).
function M.header(reply, item, user_jid)
	local name = item.from
	return reply:tag("item", { jid = user_jid, node = M.node_of(item), name = name ~= "" and name or nil }):up()
end

-- The mark on a message sent for a view or a fetch.
function M.mark(stanza, node)
	return stanza:tag("offline", { xmlns = NS }):tag("item", { node = node }):up():up()
end

-- The node of a copy we sent, and its delay stamp, or nil.
local function sent_key(stanza)
	local offline = stanza:get_child("offline", NS)
	local item = offline and offline:get_child("item")
	local node = item and item.attr.node
	if not node then return nil end
	local delay = stanza:get_child("delay", NS_DELAY)
	return node .. "\0" .. (delay and delay.attr.stamp or "") .. "\0" .. (stanza.attr.from or "")
		.. "\0" .. (stanza.attr.id or "")
end

--- The service.

local Flex = {}
Flex.__index = Flex

function M.new(cfg)
	local f = setmetatable({ enabled = true, page = M.PAGE }, Flex)
	for k, v in pairs(cfg) do f[k] = v end
	return f
end

-- The user whose queue a request is about, or nil when the requester is not one of that
-- user's own sessions (the XEP's forbidden). A request without `to` is to the requester.
function Flex:owner(origin, stanza)
	local to = stanza.attr.to
	local user, host = origin.username, origin.host
	if to then
		local node, to_host, resource = jid_split(to)
		if not node or resource or to_host ~= self.host then return nil end
		if node ~= user then return nil end
	end
	if origin.type ~= "c2s" or host ~= self.host or not user then return nil end
	return user
end

local function error_reply(stanza, etype, condition, text)
	return st.error_reply(stanza, etype, condition, text)
end

-- The deliverable row a node names in the user's queue, false when there is none, or
-- nil, err when the store failed.
function Flex:find(db, user, node, now)
	local id, ts = M.parse_node(node)
	if not id then return false end
	local items, err = db:list(self.host, user, id - 1, 1)
	if not items then return nil, err end
	local item = items[1]
	if not item or item.id ~= id or item.ts ~= ts or not self:deliverable(item, now) then return false end
	return item
end

function Flex:deliverable(item, now)
	return item.meta ~= self.set_aside_meta and not (item.expire and item.expire <= now)
end

-- Sends a row to the session, marked with its node. False when it cannot be turned into a
-- stanza (it is left where it is: the plugin sets such rows aside when it drains).
function Flex:send(session, item)
	local ok, stanza, why = pcall(self.deliver, item)
	if not ok or not stanza then
		self.log("warn", "Offline message %d of %s cannot be sent for XEP-0013: %s", item.id,
			tostring(session.full_jid), tostring(ok and why or stanza))
		return false
	end
	local node = M.node_of(item)
	M.mark(stanza, node)
	local keys = session.offline_flexible_sent
	if not keys then keys = {}; session.offline_flexible_sent = keys end
	local key = sent_key(stanza)
	keys[key] = (keys[key] or 0) + 1
	session.send(stanza)
	return true
end

-- Whether the session asked for the count, the headers or a fetch: it is then not flooded.
local function mark_session(session)
	session.offline_flexible = true
end

local function failed(self, origin, stanza, what, err)
	self.log("error", "XEP-0013 %s for %s failed: %s", what, tostring(origin.full_jid), tostring(err))
	origin.send(error_reply(stanza, "wait", "internal-server-error", "The offline store failed"))
	return true
end

-- Common to both disco nodes: nil when not ours, else the user (or true once answered).
function Flex:disco_user(event)
	if not self.enabled or event.node ~= NS then return nil end
	local origin, stanza = event.origin, event.stanza
	local user = self:owner(origin, stanza)
	if not user then
		origin.send(error_reply(stanza, "auth", "forbidden", "Only the account's own sessions can see its offline messages"))
		return true
	end
	return user
end

function Flex:info_node(event)
	local user = self:disco_user(event)
	if user == nil or user == true then return user end
	local db, err = self.db()
	local n
	if db then n, err = db:count(self.host, user) end
	if not n then return failed(self, event.origin, event.stanza, "count", err) end
	mark_session(event.origin)
	M.count_reply(event.reply, n)
	event.exists = true
	return nil -- (mod_disco sends the reply)
end

-- Every header, read a page at a time (the rows' XML never all in memory at once).
function Flex:items_node(event)
	local user = self:disco_user(event)
	if user == nil or user == true then return user end
	local db, err = self.db()
	if not db then return failed(self, event.origin, event.stanza, "headers", err) end
	local reply, user_jid, now = event.reply, user .. "@" .. self.host, self.now_us()
	local after = 0
	repeat
		local items, lerr = db:list(self.host, user, after, self.page)
		if not items then return failed(self, event.origin, event.stanza, "headers", lerr) end
		for _, item in ipairs(items) do
			if self:deliverable(item, now) then M.header(reply, item, user_jid) end
			after = item.id
		end
	until #items < self.page
	mark_session(event.origin)
	event.exists = true
	return nil
end

function Flex:query(event)
	if not self.enabled then return nil end
	local origin, stanza = event.origin, event.stanza
	if stanza.attr.type ~= "get" and stanza.attr.type ~= "set" then return nil end
	local user = self:owner(origin, stanza)
	if not user then
		origin.send(error_reply(stanza, "auth", "forbidden", "Only the account's own sessions can manage its offline messages"))
		return true
	end
	local req, condition, text = M.parse(stanza)
	if not req then
		origin.send(error_reply(stanza, "modify", condition, text))
		return true
	end
	local db, err = self.db()
	if not db then return failed(self, origin, stanza, req.kind, err) end
	if req.kind == "purge" then
		local n, perr = db:remove_user(self.host, user)
		if not n then return failed(self, origin, stanza, "purge", perr) end
		origin.send(st.reply(stanza))
	elseif req.kind == "fetch" then
		mark_session(origin)
		self:fetch(origin, stanza, user, 0)
	else
		return self:items(db, origin, stanza, user, req.items)
	end
	return true
end

-- View and remove given messages: every node is looked up first, and an unknown one
-- answers item-not-found with nothing done.
function Flex:items(db, origin, stanza, user, wanted)
	local now, rows = self.now_us(), {}
	for i, w in ipairs(wanted) do
		local item, err = self:find(db, user, w.node, now)
		if item == nil then return failed(self, origin, stanza, "lookup", err) end
		if not item then
			origin.send(error_reply(stanza, "cancel", "item-not-found", "No offline message with node " .. w.node))
			return true
		end
		rows[i] = item
	end
	local remove = {}
	for i, w in ipairs(wanted) do
		if w.action == "view" then
			self:send(origin, rows[i])
		else
			remove[#remove + 1] = rows[i].id
		end
	end
	if remove[1] then
		-- A row leased to another session goes too: the user asked for it to go. That
		-- session's ack then confirms nothing, and its release gives nothing back.
		local n, err = db:remove(self.host, user, remove)
		if not n then return failed(self, origin, stanza, "remove", err) end
	end
	origin.send(st.reply(stanza))
	return true
end

-- Every message, a page per loop turn; with XEP-0198 a page waits until mod_smacks' queue
-- holds less than a page (an ack is asked for), so a fetch never overflows it. The result
-- goes after the last message.
function Flex:fetch(session, stanza, user, after)
	if session.destroyed then return end
	local q = session.smacks and session.outgoing_stanza_queue
	if q and q.count_unacked and q:count_unacked() >= self.page then
		session.send(st.stanza("r", { xmlns = session.smacks }))
		self.later(0.05, function() self:fetch(session, stanza, user, after) end)
		return
	end
	local db, err = self.db()
	local items
	if db then items, err = db:list(self.host, user, after, self.page) end
	if not items then failed(self, session, stanza, "fetch", err) return end
	local now = self.now_us()
	for _, item in ipairs(items) do
		if self:deliverable(item, now) then self:send(session, item) end
		after = item.id
	end
	if #items < self.page then
		session.send(st.reply(stanza))
	else
		self.later(0, function() self:fetch(session, stanza, user, after) end)
	end
end

-- A login is not flooded when it, or another live session of the same user, asked for
-- the count, the headers or a fetch (the XEP: a second resource is not flooded while the
-- first one is there).
function Flex:holds_flood(session)
	if not self.enabled then return false end
	if session.offline_flexible then return true end
	for _, other in pairs(self.sessions(session.username) or {}) do
		if other ~= session and other.offline_flexible and not other.destroyed then return true end
	end
	return false
end

-- True when stanza is a copy this session was sent for a view or a fetch: the row is
-- still stored, so a copy mod_smacks gives back unacked is not stored again.
function Flex.is_copy(_, session, stanza)
	local keys = session and session.offline_flexible_sent
	if not keys or stanza.name ~= "message" then return false end
	local key = sent_key(stanza)
	if key and keys[key] then
		keys[key] = keys[key] > 1 and keys[key] - 1 or nil
		return true
	end
	return false
end

-- Wires the service into a host (mod_offline's module): the feature, the account's disco
-- node, the <offline/> iq, the no-flood rule at initial presence, and the copies of a view
-- or fetch that come back (mod_smacks' delivery/failure, or a re-queue to
-- message/offline/handle with the recipient's own session as origin). cfg is as for new,
-- plus on() -> whether offline_flexible_retrieval is on (asked again at each config
-- reload) and from_recipient(origin, username), recipient(event) (offline_store.host,
-- offline_store.policy).
function M.setup(module, cfg)
	local flex = M.new(cfg)
	local function switch()
		local on = cfg.on()
		if on == flex.advertised then return end
		flex.enabled, flex.advertised = on, on
		if on then module:add_feature(M.NS) else module:remove_item("feature", M.NS) end
	end
	switch()
	module:hook_global("config-reloaded", switch, -1)
	module:hook("account-disco-info", function(event)
		if flex.enabled then event.reply:tag("feature", { var = M.NS }):up() end
	end)
	module:hook("account-disco-info-node", function(event) return flex:info_node(event) end)
	module:hook("account-disco-items-node", function(event) return flex:items_node(event) end)
	module:hook("iq/bare/" .. M.NS .. ":offline", function(event) return flex:query(event) end)
	module:hook("message/offline/broadcast", function(event)
		if flex:holds_flood(event.origin) then return true end
	end, 0)
	module:hook("delivery/failure", function(event)
		if flex:is_copy(event.session, event.stanza) then return true end
	end, 1)
	module:hook("message/offline/handle", function(event)
		local origin = event.origin
		if origin and origin.offline_flexible_sent and cfg.from_recipient(origin, event.username or cfg.recipient(event))
			and flex:is_copy(origin, event.stanza) then
			return true
		end
	end, 0)
	return flex
end

return M
