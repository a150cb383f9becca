-- offline_store.events: the events the plugin fires on its host for other modules
-- and a site's own plugins (doc/manual.md, "Events for other modules"). Each is
-- fired only when something hooks it: with no handler, firing costs one table index
-- and no table is built, so the store path stays as cheap as without events.
--
--   local ev = events.new(host_events)  -- prosody.hosts[host].events
--   ev:store(stanza, username, origin)  -> stanza to store | nil, reason (vetoed)
--   ev:stored(stanza, username, id, count)
--   ev:rejected(stanza, username, reason [, detail])
--   ev:delivered(session, count)        ev:acked(session, count)
--   ev:pending(stanza, username, id, count)  a batched store, told at ev:commit()
--   ev:commit()                         the batch committed: `stored` for each pending
--   ev:lost()                           the batch rolled back: `rejected` ("failure") for each

local setmetatable = setmetatable

local _ENV = nil
-- luacheck: std none

local M = {}
local methods = {}
methods.__index = methods

M.STORE = "offline-store/store"
M.STORED = "offline-store/stored"
M.REJECTED = "offline-store/rejected"
M.DELIVERED = "offline-store/delivered"
M.ACKED = "offline-store/acked"

-- Events of a host where nothing listens (unit specs, tools).
M.NONE = { get_handlers = function() return nil end, fire_event = function() end, _event_map = {} }

-- hooks[name] is nil when nothing hooks the event. It is util.events' own map of each
-- event's handlers (which Prosody's net.http.server reads too), whose entry goes when its
-- last handler does: one index, where get_handlers costs a call and, for an event nobody
-- hooks, its index's metamethod every time. An events object without that map is asked
-- through get_handlers.
local function hooks_of(host_events)
	local map = host_events._event_map
	if map then return map end
	local get = host_events.get_handlers
	return setmetatable({}, { __index = function(_, name) return get(name) end })
end

function M.new(host_events)
	return setmetatable({ hooks = hooks_of(host_events), fire = host_events.fire_event, queue = {}, n = 0 }, methods)
end

function methods:hooked(name) return self.hooks[name] ~= nil end

function methods:store(stanza, username, origin)
	if self.hooks[M.STORE] == nil then return stanza end
	local event = { stanza = stanza, username = username, origin = origin }
	if self.fire(M.STORE, event) then return nil, event.reason or "vetoed" end
	return event.stanza or stanza
end

function methods:stored(stanza, username, id, count)
	if self.hooks[M.STORED] == nil then return end
	self.fire(M.STORED, { stanza = stanza, username = username, id = id, count = count })
end

function methods:rejected(stanza, username, reason, detail)
	if self.hooks[M.REJECTED] == nil then return end
	self.fire(M.REJECTED, { stanza = stanza, username = username, reason = reason, detail = detail })
end

local function session_event(self, name, session, count)
	if self.hooks[name] == nil then return end
	self.fire(name, { session = session, username = session.username, count = count })
end

function methods:delivered(session, count) session_event(self, M.DELIVERED, session, count) end
function methods:acked(session, count) session_event(self, M.ACKED, session, count) end

-- Group commit: a store joins the open transaction and is `stored` when it
-- commits, never before.
function methods:pending(stanza, username, id, count)
	local hooks = self.hooks
	if hooks[M.STORED] == nil and hooks[M.REJECTED] == nil then return end
	local n = self.n + 4
	local q = self.queue
	q[n - 3], q[n - 2], q[n - 1], q[n] = stanza, username, id, count
	self.n = n
end

local function drain(self, each)
	local q, n = self.queue, self.n
	if n == 0 then return end
	self.queue, self.n = {}, 0
	for i = 1, n, 4 do each(self, q[i], q[i + 1], q[i + 2], q[i + 3]) end
end

function methods:commit() drain(self, self.stored) end

local function lost(self, stanza, username) self:rejected(stanza, username, "failure") end
function methods:lost() drain(self, lost) end

return M
