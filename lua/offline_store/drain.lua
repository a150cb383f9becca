-- offline_store.drain: a user's queue delivered to one session a page at a time.
--
-- With XEP-0198 on the session (mod_smacks: session.smacks and
-- session.outgoing_stanza_queue), a page is leased (the rows stay stored), sent,
-- and followed by an ack request; a row is deleted when the client's acks cover
-- it, and the next page goes once the whole page is acked. The position of each
-- row in the session's outbound stanza count is read from mod_smacks' queue
-- right after sending it. When the session ends, what is still leased is
-- released: the rows are queued again as they were. Without XEP-0198 a page is
-- popped (delivered = written) and the next one goes when the connection has
-- written it (c2s-ondrain).
--
-- Host-agnostic: the plugin passes what touches Prosody (timers, the store, the
-- stanza of a row) in `cfg`, and calls the methods from its event handlers:
--
--   local d = drain.new { host =, page =, lease = seconds, owner_prefix =,
--       db = f() -> db | nil, err,    now_us = f(),
--       deliver = f(item) -> stanza | nil, why,   set_aside = f(username, item, why),
--       later = f(seconds, fn),      request_ack = f(session),
--       log = f(level, fmt, ...),    delivered = f(n, session),  failed = f(operation),
--       on_acked = f(session, n) (optional: rows the client's acks confirmed),
--       timed = nil | f(µs) }       (each page's read and sending, when the clock is wanted)
--   d:start(session)            message/offline/broadcast: O(1) count, then a page from a timer
--   d:acked(session)            after mod_smacks handled an <a/> (or a <resume/>'s h)
--   d:failure(session, stanza)  true when stanza is a leased row of the session (not to be stored)
--   d:unbind(session)           the session ended: release its lease, wake the user's other sessions
--   d:ondrain(session)          the session's connection wrote everything it had
--   d.key(stanza, host, text)   what recognises a delivered row in a copy of it

local ipairs, pairs, next, pcall, tostring = ipairs, pairs, next, pcall, tostring
local max, min = math.max, math.min
local setmetatable = setmetatable

local _ENV = nil
-- luacheck: std none

local M = {}
local Drain = {}
Drain.__index = Drain

local NS_DELAY = "urn:xmpp:delay"

-- A delivered row carries one delay from this host with the delivery text. Its
-- stamp, the sender and the stanza id say which row a copy (mod_smacks queues a
-- clone) came from: the copy has none of the Lua fields of what was sent.
function M.key(stanza, host, text)
	local tags = stanza.tags
	for i = #tags, 1, -1 do
		local c = tags[i]
		if c.name == "delay" and c.attr.xmlns == NS_DELAY and c.attr.from == host and c:get_text() == text then
			return (c.attr.stamp or "") .. "\0" .. (stanza.attr.from or "") .. "\0" .. (stanza.attr.id or "")
		end
	end
end

function M.new(cfg)
	local d = setmetatable({}, Drain)
	for k, v in pairs(cfg) do d[k] = v end
	d.lease_us = cfg.lease * 1000000
	d.waiting = {} -- username -> { [session] = true }: sessions held back by another's lease
	return d
end

-- The drain state of a session, on the session table (it survives resumption
-- and a reload of the module). owner names the session's lease in the store.
local function state(self, session)
	local s = session.offline_drain
	if not s then
		s = { owner = self.owner_prefix .. tostring(session.id or session), inflight = {} }
		session.offline_drain = s
	end
	return s
end

-- The next page, from a timer: lets an <enable/> that came with the initial
-- presence be handled first, and never sends from inside a send.
function Drain:schedule(session)
	local s = session.offline_drain
	if not s or s.scheduled then return end
	s.scheduled = true
	self.later(0, function()
		s.scheduled = false
		if session.offline_drain == s then self:pump(session) end
	end)
end

function Drain:start(session)
	local db, err = self.db()
	local n
	if db then n, err = db:count(self.host, session.username) end
	if not n then
		self.failed("pop")
		self.log("error", "Reading offline messages of %s@%s failed: %s; they stay stored",
			tostring(session.username), self.host, tostring(err))
		return
	end
	if n == 0 then return end -- (most logins)
	state(self, session).eligible = true
	self:schedule(session)
end

-- Held back by another session's lease until `until_` (µs): tried again then
-- (another node's lease), or at once when a session of this node releases.
local function wait(self, session, username, until_, now)
	local w = self.waiting[username]
	if not w then w = {}; self.waiting[username] = w end
	w[session] = true
	local s = session.offline_drain
	local gen = (s.wait_gen or 0) + 1
	s.wait_gen = gen
	self.later(max(0.5, min((until_ - now) / 1000000 + 0.1, 60)), function()
		if session.offline_drain == s and s.wait_gen == gen then self:schedule(session) end
	end)
end

local function unwait(self, session, username)
	local w = self.waiting[username]
	if w and w[session] then
		w[session] = nil
		if next(w) == nil then self.waiting[username] = nil end
	end
end

-- One page to the session, if it can take one now.
function Drain:pump(session)
	local s = session.offline_drain
	if not s or not s.eligible or s.sending or s.inflight[1] or session.destroyed or session.hibernating then return end
	local username, host = session.username, self.host
	local db, err = self.db()
	if not db then
		self.failed("pop")
		self.log("error", "Reading offline messages of %s@%s failed: %s; they stay stored", username, host, tostring(err))
		return
	end
	local q = session.smacks and session.outgoing_stanza_queue
	local now = self.now_us()
	local items, leased_until, code, expired
	if q then
		items, leased_until, code = db:lease(host, username, s.owner, now, now + self.lease_us, self.page)
		if items and #items > 0 then s.leased = true end
	else
		items, expired, leased_until = db:pop(host, username, now, self.page)
		if not items then leased_until, code = expired, leased_until end
	end
	if not items then
		self.failed("pop")
		self.log("error", "Reading offline messages of %s@%s failed: %s (code %s); they stay stored",
			username, host, tostring(leased_until), tostring(code))
		return
	end
	local timed = self.timed
	if #items == 0 then
		if timed then timed(self.now_us() - now) end
		if leased_until then return wait(self, session, username, leased_until, now) end
		-- (a page that only passed over expired rows, which it deleted: go on)
		if expired and expired > 0 then return self:schedule(session) end
		unwait(self, session, username)
		s.eligible = false -- all delivered (until the next login)
		return
	end
	unwait(self, session, username)

	s.sending = true
	local sent, done = 0, {}
	for _, item in ipairs(items) do
		if session.destroyed or (q and session.outgoing_stanza_queue ~= q) then break end
		local ok, stanza, why = pcall(self.deliver, item)
		if ok and stanza then
			-- (with XEP-0198: what failure() recognises; in flight once mod_smacks queued it)
			local row, before = q and { id = item.id, stanza = stanza }, q and q:count_acked() + q:count_unacked()
			s.sending_row = row
			local sok, serr = pcall(session.send, stanza)
			s.sending_row = nil
			local seq = q and q:count_acked() + q:count_unacked()
			if q and seq > before then
				-- queued by mod_smacks: deleted when acked (a send that raised included)
				row.seq = seq
				s.inflight[#s.inflight + 1] = row
			end
			if not sok then
				-- not written: leased, the row stays held until the session ends and is
				-- released then; popped, it is set aside rather than lost
				self.log("error", "Sending offline message %d to %s failed: %s", item.id,
					tostring(session.full_jid), tostring(serr))
				if not q then self.set_aside(username, item, serr) end
			else
				-- written, and (with XEP-0198) not queued by mod_smacks (a filter dropped
				-- it): delivered as written
				if q and seq <= before then done[#done + 1] = item.id end
				sent = sent + 1
			end
		elseif self.set_aside(username, item, ok and why or stanza) and q then
			done[#done + 1] = item.id -- (its set-aside copy replaces it; if that failed, it stays leased)
		end
	end
	s.sending = false
	if timed then timed(self.now_us() - now) end
	if sent > 0 then self.delivered(sent, session) end
	if done[1] then self:confirm(session, done) end
	if not q then
		if #items < self.page then s.eligible = false; return end
		s.waiting_drain = true
		if session.send_buffer then self:poll_buffer(session) end -- (BOSH: no c2s-ondrain)
		return
	end
	if session.destroyed then
		-- ended while sending: its release has run already
		self:release(session)
	elseif s.inflight[1] then
		self.request_ack(session)
	else
		self:schedule(session)
	end
end

-- A session whose transport buffers in session.send_buffer (BOSH): the next
-- page once the client has fetched the last one.
function Drain:poll_buffer(session)
	local s = session.offline_drain
	self.later(0.1, function()
		if session.offline_drain ~= s or not s.waiting_drain or session.destroyed then return end
		if #session.send_buffer == 0 then self:ondrain(session) else self:poll_buffer(session) end
	end)
end

function Drain:confirm(session, ids)
	local db, err = self.db()
	local n, code
	if db then n, err, code = db:confirm(self.host, session.username, ids) end
	if not n then
		self.failed("confirm")
		self.log("error", "Deleting %d acknowledged offline messages of %s@%s failed: %s (code %s); "
			.. "they will be delivered again", #ids, session.username, self.host, tostring(err), tostring(code))
	end
	return n
end

-- mod_smacks has taken an ack: the rows it covers are delivered.
function Drain:acked(session)
	local s = session.offline_drain
	local q = session.outgoing_stanza_queue
	if not s or not s.inflight[1] or not q then return end
	local h = q:count_acked()
	local inflight, done, rest = s.inflight, {}, {}
	for _, row in ipairs(inflight) do
		if row.seq <= h then
			done[#done + 1] = row.id
		else
			rest[#rest + 1] = row
		end
	end
	if not done[1] then return end
	s.inflight = rest
	if self:confirm(session, done) and self.on_acked then self.on_acked(session, #done) end
	if not rest[1] then self:schedule(session) end
end

-- After a resumption (its h acked what it covers; mod_smacks re-sent the rest).
function Drain:resumed(session)
	self:acked(session)
	local s = session.offline_drain
	if s and not s.inflight[1] then self:schedule(session) end
end

-- Whether row (in flight, or being sent) is the row of key and not recognised
-- already; its own key is read once, when first needed (most sessions never need it).
local function is_row(self, row, key)
	if not row or row.recognised then return false end
	local k = row.key
	if k == nil then
		k = M.key(row.stanza, self.host, self.delay_text) or false
		row.key = k
	end
	if k ~= key then return false end
	row.recognised = true
	return true
end

function Drain:failure(session, stanza)
	local s = session and session.offline_drain
	if not s or not (s.inflight[1] or s.sending_row) then return nil end
	local key = M.key(stanza, self.host, self.delay_text)
	if not key then return nil end
	if is_row(self, s.sending_row, key) then return true end
	for _, row in ipairs(s.inflight) do
		if is_row(self, row, key) then return true end
	end
	return nil
end

local RELEASE_RETRY = 5 -- seconds between attempts at a release that failed

function Drain:release(session)
	local s = session.offline_drain
	if not s or not s.leased then return end
	s.inflight, s.sending_row, s.leased = {}, nil, false
	local db, err = self.db()
	local n, code
	if db then n, err, code = db:release(self.host, session.username, s.owner) end
	if not n then
		self.failed("release")
		self.log("error", "Releasing the offline messages leased to %s failed: %s (code %s); tried again in"
			.. " %d s", tostring(session.full_jid), tostring(err), tostring(code), RELEASE_RETRY)
		-- (until then this node's lease renewal keeps them held: they must not wait for a restart)
		local username, owner = session.username, s.owner
		local function retry()
			local rdb = self.db()
			if rdb and rdb:release(self.host, username, owner) then
				for other in pairs(self.waiting[username] or {}) do self:schedule(other) end
				return
			end
			return RELEASE_RETRY
		end
		self.later(RELEASE_RETRY, retry)
	elseif n > 0 then
		self.log("debug", "Released %d unacknowledged offline messages of %s", n, tostring(session.full_jid))
	end
end

function Drain:unbind(session)
	local s = session.offline_drain
	if not s then return end
	local username = session.username
	self:release(session)
	s.eligible, s.waiting_drain = false, false
	unwait(self, session, username)
	local w = self.waiting[username]
	if w then
		for other in pairs(w) do self:schedule(other) end
	end
end

function Drain:ondrain(session)
	local s = session.offline_drain
	if s and s.waiting_drain then
		s.waiting_drain = false
		self:schedule(session)
	end
end

return M
