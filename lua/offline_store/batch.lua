-- offline_store.batch: group commit for the plugin. Stores join one open
-- transaction (db:begin) and become durable together at flush(); the plugin
-- flushes before anything leaves the server (so no reply, ack or delivery can
-- overtake the commit of a message handled before it), at the end of the event
-- loop turn, and when `max` stores are pending. Host-agnostic: the server side
-- (filters, timers, error stanzas) is the caller's, through three callbacks.
--
--   local b = batch.new(db, { max = 256, on_open = f(), on_close = f(),
--                             on_commit = f(n), on_lost = f(tokens, err, code, users),
--                             before_write = f(), on_stored = f(token, user, count, id),
--                             on_refused = f(token, user, false, why, count) })
--
-- before_write runs before this batch takes the database for anything (begin,
-- or any call through idle/guarded): the caller commits other batches there that
-- may hold the same file's write lock (several hosts on one sqlite file).
-- on_stored runs for each store that joined the open batch, before a flush it
-- may cause (so a caller can tell its on_commit what each store was).
--   b:store(token, <db:store arguments>)  -> what db:store returns (up to evict),
--                                            or true: decided at the flush
--
-- Pipelined (a backend with db:send, PostgreSQL): a store without eviction is
-- sent without waiting for its outcome and returns true. Its outcome is read at
-- the flush: once the batch committed, on_stored runs for each of them that was
-- stored (then on_commit), and on_refused afterwards for each refused by the
-- limit or found a duplicate (what db:store would have returned, after the
-- token and user); when it did not commit, every token goes to on_lost, whose
-- users[i] is the user of tokens[i] when that was a send (nobody heard of it
-- through on_stored).
--   b:flush()                              -> true | nil, err, code
--   b:idle()                               -> the db, after a flush (for every other call)
--
-- `token` is whatever the caller needs to tell a sender that its message was
-- lost after all: on_lost gets the tokens of every store of a batch that did not
-- commit, in order. A store's own failure is returned to the caller as before;
-- the tokens passed to on_lost are those of the earlier stores it took with it.

local setmetatable, type = setmetatable, type

local _ENV = nil
-- luacheck: std none

local M = {}
local mt = { __index = {} }
local methods = mt.__index

local function noop() end

function M.new(db, opts)
	opts = opts or {}
	return setmetatable({
		db = db,
		max = opts.max or 256,
		on_open = opts.on_open or noop,
		before_write = opts.before_write or noop,
		on_close = opts.on_close or noop,
		on_commit = opts.on_commit or noop,
		on_lost = opts.on_lost or noop,
		on_stored = opts.on_stored or noop,
		on_refused = opts.on_refused or noop,
		open = false,      -- a batch is open on db
		unbatched = false, -- db has no group commit: every store commits itself
		unpiped = false,   -- db has no db:send
		tokens = {},
		n = 0,
		sends = {},        -- [i] = the n of the i-th send's token
		users = {},        -- [n] = the user of token n when it was sent
		sent = 0,
	}, mt)
end

local function take(self)
	local tokens, n, sends, users, sent = self.tokens, self.n, self.sends, self.users, self.sent
	self.open, self.tokens, self.n = false, {}, 0
	if sent > 0 then self.sends, self.users, self.sent = {}, {}, 0 end
	self.on_close()
	return tokens, n, sends, users, sent
end

-- A token joins the open batch; returns how many it holds.
local function join(self, token)
	local n = self.n + 1
	self.n, self.tokens[n] = n, token
	return n
end

-- (The arguments are spelled out rather than passed as `...`: this runs for
-- every message stored, and a vararg call costs a copy of the frame.)
function methods:store(token, h, user, from, xml, ts, expire, max_count, max_bytes, meta, dedup, evict)
	local db = self.db
	if not self.open and not self.unbatched then
		self.before_write()
		local ok, err, code = db:begin()
		if ok == nil then return nil, err, code end -- cannot even start: like a failed store
		if ok then
			self.open = true
			self.on_open()
		else
			self.unbatched = true
		end
	end
	if self.open and not evict and not self.unpiped then
		local ok, why, code = db:send(h, user, from, xml, ts, expire, max_count, max_bytes, meta, dedup)
		if ok then
			local n, i = join(self, token), self.sent + 1
			self.sent, self.sends[i], self.users[n] = i, n, user
			if n >= self.max then self:flush() end
			return true
		elseif why == "not pipelined" then
			self.unpiped = true
		elseif ok == false and why == "too deep" then
			return false, why -- nothing was done
		else
			return self:lost(why, code)
		end
	end
	local count, why, current = db:store(h, user, from, xml, ts, expire, max_count, max_bytes, meta, dedup, evict)
	if not self.open then return count, why, current end
	if count then
		local n = join(self, token)
		self.on_stored(token, user, count, why)
		if n >= self.max then self:flush() end
	elseif count == nil then
		return self:lost(why, current)
	end
	return count, why, current
end

-- A store or send failed: that rolled back the whole batch.
function methods:lost(err, code)
	local tokens, n, _, users = take(self)
	if n > 0 then self.on_lost(tokens, err, code, users) end
	return nil, err, code
end

function methods:flush()
	if not self.open then return true end
	local tokens, n, sends, users, sent = take(self)
	local db = self.db
	local ok, err, code = db:commit()
	if not ok then
		if n > 0 then self.on_lost(tokens, err, code, users) end
		return nil, err, code
	end
	if sent == 0 then
		self.on_commit(n)
		return true
	end
	-- The outcomes, all read before any callback runs (a callback may store, and a
	-- new batch forgets them).
	local out, stored = {}, n
	for i = 1, sent do
		local count, why, current = db:outcome(i)
		out[3 * i - 2], out[3 * i - 1], out[3 * i] = count, why, current
		if not count then stored = stored - 1 end
	end
	for i = 1, sent do
		local t = sends[i]
		if out[3 * i - 2] then self.on_stored(tokens[t], users[t], out[3 * i - 2], out[3 * i - 1]) end
	end
	self.on_commit(stored)
	if stored < n then
		for i = 1, sent do
			local t = sends[i]
			if not out[3 * i - 2] then
				self.on_refused(tokens[t], users[t], out[3 * i - 2], out[3 * i - 1], out[3 * i])
			end
		end
	end
	return true
end

-- The db with no batch open, for any call other than store.
function methods:idle()
	self:flush()
	self.before_write()
	return self.db
end

-- A stand-in for the db whose every method flushes first (for code that takes a
-- db, such as offline_store.admin and the shell commands).
function methods:guarded()
	local b = self
	return setmetatable({}, { __index = function(_, name)
		local f = b.db[name]
		if type(f) ~= "function" then return f end
		return function(_, ...) return f(b:idle(), ...) end
	end })
end

return M
