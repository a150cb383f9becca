-- offline_store.host: what mod_offline does on one host, apart from Prosody's module
-- API: the store and its group-commit batch (opened again on use when it could not be
-- at load), the recipients' limits, storing a message or answering its sender, setting
-- aside a row that cannot be delivered, leases at start, the expiry sweep and orphaned
-- queues. The plugin passes in what touches the server (cfg below) and calls the
-- methods from its event handlers, so all of this runs in specs without a server.

local policy = require "offline_store.policy"
local admin = require "offline_store.admin"
local group_commit = require "offline_store.group"
local drain = require "offline_store.drain"
local events = require "offline_store.events"
local jid_bare = require "util.jid".bare
local st = require "util.stanza"

local floor, type, tostring, tonumber, pairs, ipairs, pcall, setmetatable, require =
	math.floor, type, tostring, tonumber, pairs, ipairs, pcall, setmetatable, require
local times = policy.times

local _ENV = nil
-- luacheck: std none

local M = {}
local Host = {}
Host.__index = Host

-- A store that could not be opened at load (PostgreSQL refused the connection
-- or the login) is tried again when a message or a login needs it, at most once
-- every REOPEN_EVERY seconds; a try waits at most 200 ms for the server (an open
-- store connects and reconnects by itself, without waiting: the C core). No timer
-- drives reconnection: the calls do, and nothing needs the database without one.
M.REOPEN_EVERY = 5
M.BATCH_MAX = 256
-- Every store asks for the recipient's limits (0.12's admin check reads
-- storage): remembered per recipient (-1 for "infinity"; the byte limit, when
-- a byte rule is defined, in a second cache) until the config is reloaded, for
-- up to LIMITS_KEPT recipients, then afresh. Kept in C, off the
-- Lua heap: a Lua table of one entry per recipient made Prosody's collector
-- touch every key on every cycle, which at 10,000 recipients cost more than
-- the store (doc/performance.md).
M.LIMITS_KEPT = 50000

-- cfg:
--   host, settings (offline_store.options.read), core (offline_store.core)
--   open(settings) -> db | nil, err       opens the host's store
--   limit(bare) -> n | nil                the limit rules (offline_store.limits.compile)
--   limit_bytes(bare) -> n | nil, or false  the byte rule's (false: no byte limit)
--   log(level, fmt, ...), send(stanza)    module:log, module:send
--   later(seconds, fn)                    module:add_timer
--   now() -> seconds                      util.time.now
--   metrics (offline_store.metrics), notice (offline_store.ratelog)
--   group (offline_store.group's shared table), stores (host -> the shell's store)
--   ev (offline_store.events), is_disabled(username) -> bool | nil (Prosody 13)
function M.new(cfg)
	local self = setmetatable({}, Host)
	for k, v in pairs(cfg) do self[k] = v end
	self.ev = cfg.ev or events.new(events.NONE)
	self.limits_seen = cfg.core.cache(M.LIMITS_KEPT)
	self.bytes_seen = cfg.core.cache(M.LIMITS_KEPT)
	self.reopen_at = 0
	self.handed_over = false
	return self
end

function Host:now_us() return floor(self.now() * 1000000) end

--- The store: opened at load, closed at unload. A memory store is handed over
--- across a module reload so its messages survive it.

-- b: the batch over db; guarded: the stand-in for db that flushes it first (every
-- host's is in `stores`, for the live shell's commands).
function Host:attach(new_db)
	self.db = new_db
	local m, host = self.metrics, self.host
	local b = group_commit.batch(self.group, new_db, {
		max = M.BATCH_MAX,
		later = function(fn) self.later(0, fn) end,
		on_stored = function(stanza, username, count, id) self.ev:pending(stanza, username, id, count) end,
		on_refused = function(stanza, username, ...) self:stored(stanza, username, false, ...) end,
		on_commit = function(n)
			self.ev:commit()
			m.stored:add(n)
			self.log("debug", "Committed %d offline messages", n)
		end,
		on_lost = function(lost, err, code, sent_to)
			m.failed:with_labels("write"):add(#lost)
			self.notice:line("failed", "error", "Committing %d offline messages failed: %s (code %s); their senders are told",
				#lost, err, tostring(code))
			for i, stanza in ipairs(lost) do
				self:tell_sender(stanza, policy.failure_error(stanza))
				-- (a store made at once is told as failed by ev:lost(); a send, here)
				if sent_to[i] then self.ev:rejected(stanza, sent_to[i], "failure") end
			end
			self.ev:lost()
		end,
	})
	self.b, self.guarded = b, b:guarded()
	self.stores[host] = self.guarded
end

-- The batch over the store, or nil and why there is none.
function Host:usable_batch()
	if self.b then return self.b end
	local t = self.now()
	if t < self.reopen_at then return nil, self.open_err end
	self.reopen_at = t + M.REOPEN_EVERY
	local new_db, err = self.open(self.settings)
	if not new_db then
		self.open_err = err
		return nil, err
	end
	self:attach(new_db)
	self.log("info", "Offline store open after all: %s", tostring(self.db))
	return self.b
end

-- module.load: `opened` is the store opened at load, or nil and open_err.
function Host:load(opened, open_err)
	if not self.db then -- (else: restored from a reload)
		if opened then
			self:attach(opened)
			self.later(0, function() self:adopt_unparsable() end)
		else
			self.open_err = open_err
			self.reopen_at = self.now() + M.REOPEN_EVERY
			self.log("error", "%s; until it opens (tried again on use, at most every %d s) messages "
				.. "to offline users get the storage-failure error", open_err, M.REOPEN_EVERY)
		end
	end
	self.log("debug", "Offline store open: %s", tostring(self.db))
end

function Host:flush()
	if self.b then self.b:flush() end
end

-- module.save / module.restore: a memory store goes to the next instance.
function Host:save()
	self:flush()
	if self.settings.store.backend == "memory" then
		self.handed_over = true
		return { db = self.db }
	end
end

function Host:restore(data)
	if data.db and self.settings.store.backend == "memory" then
		if self.db then self.db:close() end
		self:attach(data.db)
	elseif data.db then
		data.db:close()
	end
end

function Host:unload()
	local b = self.b
	if b then
		b:flush()
		self.group.open[b] = nil
		if self.stores[self.host] == self.guarded then self.stores[self.host] = nil end
	end
	if self.db and not self.handed_over then self.db:close() end
	self.db, self.b, self.guarded = nil, nil, nil
end

--- Limits.

-- One limit of username's, from its cache or asked of the rule (nil: infinity).
local function remembered(self, seen, rule, username)
	local v = seen:get(username)
	if v == nil then
		v = rule(username .. "@" .. self.host) or -1
		seen:set(username, v)
	end
	if v >= 0 then return v end
end

-- The recipient's max count and max bytes (nil: no limit).
function Host:limit_for(username)
	local limit_bytes = self.limit_bytes
	return remembered(self, self.limits_seen, self.limit, username),
		limit_bytes and remembered(self, self.bytes_seen, limit_bytes, username) or nil
end

-- New rules (a config reload): every remembered limit is asked again.
function Host:set_limit(limit, limit_bytes)
	self.limit, self.limit_bytes = limit, limit_bytes
	self.limits_seen:clear()
	self.bytes_seen:clear()
end

--- Storing.

function Host:tell_sender(stanza, reply)
	if stanza.attr.from then self.send(reply) end
end

-- True when the event came from the recipient's own session (mod_smacks
-- re-queueing unacked messages): errors then go back through the caller.
function Host:from_recipient(origin, username)
	return origin ~= nil and origin.username == username and origin.host == self.host
end

-- One store: through the batch, or (a re-queue) at once on the idle db.
function Host:put(requeued, stanza, username, from, xml, ts, expire, limit, limit_bytes, dedup)
	local batch, err = self:usable_batch()
	if not batch then return nil, err, 0 end
	local evict = self.settings.over_limit == "drop_oldest"
	if requeued then
		return batch:idle():store(self.host, username, from, xml, ts, expire, limit, limit_bytes, nil, dedup, evict)
	end
	return batch:store(stanza, self.host, username, from, xml, ts, expire, limit, limit_bytes, nil, dedup, evict)
end

-- XEP-0359: a message with an origin-id is stored once per sender bare JID
-- (clients resend after a reconnect without resumption).
local NS_SID = "urn:xmpp:sid:0"
local function dedup_of(stanza, from)
	local origin_id = stanza:get_child("origin-id", NS_SID)
	local id = origin_id and origin_id.attr.id
	if type(id) ~= "string" or id == "" or from == "" then return nil end
	return jid_bare(from) .. "\0" .. id
end

-- Runs for every message to an offline user. db:store takes the stanza and
-- writes its XML in C; a tree too deep for that comes back as false, "too
-- deep", and is stored as the string util.stanza writes. mod_smacks waits for
-- the answer to a re-queue: that one is committed at once.
function Host:store_message(origin, stanza, username)
	local host, m = self.host, self.metrics
	-- handlers of offline-store/store may rewrite the message, or veto it
	local kept, vetoed = self.ev:store(stanza, username, origin)
	if not kept then
		m.dropped:with_labels(vetoed):add(1)
		self.log("debug", "Not storing a message for %s@%s: %s", username, host, vetoed)
		self.ev:rejected(stanza, username, "policy", vetoed)
		return true
	end
	stanza = kept
	-- Delay stamps are believed only on messages the server re-queues from the
	-- recipient's own session (mod_smacks): a sender can forge any `from`.
	local requeued = self:from_recipient(origin, username)
	local ts, expire = times(stanza, self:now_us(),
		requeued and { [host] = true, [username .. "@" .. host] = true } or nil)
	local from = stanza.attr.from or ""
	local limit, limit_bytes = self:limit_for(username)
	local dedup = dedup_of(stanza, from)
	local started = m.timed and self.now()
	local count, why, current = self:put(requeued, stanza, username, from, stanza, ts, expire, limit, limit_bytes, dedup)
	if count == false and why == "too deep" then
		count, why, current = self:put(requeued, stanza, username, from, policy.stored_xml(stanza), ts, expire, limit,
			limit_bytes, dedup)
	end
	if started then m.write:sample(self.now() - started) end
	if count == true then return true end -- (sent: its outcome comes when the batch commits)
	return self:stored(stanza, username, requeued, count, why, current)
end

-- What a store's outcome (as db:store returns it) means for the message and its
-- sender; returns the handler's result.
function Host:stored(stanza, username, requeued, count, why, current)
	local host, m = self.host, self.metrics
	if count == false and why == "duplicate" then
		m.dropped:with_labels("duplicate"):add(1)
		self.log("debug", "Not storing a message for %s@%s again (same origin-id from the same sender)", username, host)
		self.ev:rejected(stanza, username, "duplicate")
		return true
	end
	if count then
		if current and current > 0 then -- (drop_oldest made room)
			m.evicted:add(current)
			self.log("debug", "Removed the %d oldest offline messages of %s@%s to make room", current, username, host)
		end
		-- (a batched store is counted, and logged, when its batch commits)
		if requeued or self.b.unbatched then
			m.stored:add(1)
			self.log("debug", "Stored offline message for %s@%s (%d queued)", username, host, count)
			self.ev:stored(stanza, username, why, count)
		end
		return true
	end
	if count == false then
		self.ev:rejected(stanza, username, "limit")
		if self.settings.over_limit == "drop" and not requeued then
			m.dropped:with_labels("over_limit"):add(1)
			self.notice:line("rejected", "warn", "Offline queue of %s@%s is full (%d messages); a message was dropped",
				username, host, current)
			return true
		end
		m.rejected:add(1)
		self.notice:line("rejected", "warn", "Offline queue of %s@%s is full (%d messages); a message was rejected", username, host, current)
		if requeued then return nil end
		self:tell_sender(stanza, policy.limit_error(stanza))
		return true
	end
	m.failed:with_labels("write"):add(1)
	self.notice:line("failed", "error", "Storing an offline message for %s@%s failed: %s (code %s)", username, host, why, tostring(current))
	self.ev:rejected(stanza, username, "failure")
	if requeued then return nil end
	self:tell_sender(stanza, policy.failure_error(stanza))
	return true
end

-- Returns the handler's result for a message offered for storage.
function Host:offer(origin, stanza, username)
	if self.is_disabled and self.is_disabled(username) then
		self.metrics.dropped:with_labels("disabled"):add(1)
		self.ev:rejected(stanza, username, "policy", "account disabled")
		self.log("debug", "Not storing a message for disabled account %s@%s", username, self.host)
		return nil -- Prosody bounces it as for an account that does not exist
	end
	local action, reason = policy.classify(stanza, self.settings.groupchat)
	if action == "store" then return self:store_message(origin, stanza, username) end
	self.metrics.dropped:with_labels(reason):add(1)
	self.ev:rejected(stanza, username, "policy", reason)
	if action == "bounce" then
		if self:from_recipient(origin, username) then return nil end
		self.log("debug", "Bouncing %s message to offline %s@%s", reason, username, self.host)
		self:tell_sender(stanza, policy.bounce_error(stanza))
		return true
	end
	self.log("debug", "Not storing a %s message for %s@%s", reason, username, self.host)
	return true
end

-- Groupchat to a bare JID (message/bare/groupchat); user: the recipient's bare session,
-- if any. Online, it goes to their sessions (the groupchat option off: to Prosody's usual
-- bounce); offline, or when no session took it, it is offered for storage.
function Host:groupchat(event, user)
	local stanza = event.stanza
	if user and user.top_resources and #user.top_resources > 0 then
		if not self.settings.groupchat then return nil end
		local sent
		for _, session in pairs(user.top_resources) do sent = session.send(stanza) or sent end
		if sent then return true end
	end
	return self:offer(event.origin, stanza, policy.recipient(event))
end

--- Rows that cannot be delivered.

-- A row that cannot be turned back into a stanza (damaged, or written by
-- another program) is set aside once: stored again in the recipient's own
-- queue with core.SET_ASIDE as its meta, which pop skips from then on. It
-- counts toward their limits, shows in `offline list` and goes with delete,
-- purge, expiry and the account; it is never retried nor logged again.
function Host:set_aside(username, item, why)
	local host = self.host
	local n, id_or_err, code = self.b:idle():store(host, username, item.from, item.xml, item.ts, item.expire,
		nil, nil, self.core.SET_ASIDE)
	self.metrics.failed:with_labels("deliver"):add(1)
	if n then
		self.log("error", "Offline message %d for %s@%s cannot be delivered (%s); set aside in their queue "
			.. "as message %d (`offline list`)", item.id, username, host, tostring(why), id_or_err)
		return true
	end
	self.log("error", "Offline message %d for %s@%s cannot be delivered (%s), and setting it aside "
		.. "failed: %s (code %s)", item.id, username, host, tostring(why), id_or_err, tostring(code))
	return false
end

-- Rows kept by earlier versions under "HOST!unparsable" (no limit, kept past
-- the account): moved into their users' queues as set-aside rows, once. Costs
-- one look-up at load when there are none. Run from the loop, not at load:
-- Prosody -D forks after loading modules, and a daemon does not inherit the
-- locks sqlite takes on its first read.
function Host:adopt_unparsable()
	local db_ = self.guarded
	if not db_ then return end
	local host = self.host
	local old = host .. "!unparsable"
	for _, u in ipairs(db_:users(old) or {}) do
		local items = db_:list(old, u.user)
		local moved = items ~= nil -- (a failed list moves nothing and removes nothing)
		for _, item in ipairs(items or {}) do
			moved = db_:store(host, u.user, item.from, item.xml, item.ts, item.expire, nil, nil, self.core.SET_ASIDE)
				and moved
		end
		if moved and db_:remove_user(old, u.user) then
			self.log("info", "Moved %d undeliverable offline messages of %s@%s from %q into their queue, set aside",
				#items, u.user, host, old)
		end
	end
end

--- Delivery: the user's queue goes to a session that comes online a page at a time
--- (offline_store.drain): with XEP-0198 each page is leased and its rows deleted when
--- the client acks them; without it, popped and written.

-- The <r/> that closes a page: a small write right behind a large one, which
-- Nagle's algorithm would hold until the client's delayed ACK (40 ms on
-- Linux), for every page. Prosody leaves Nagle on by default; a
-- session being drained asks for its writes to go out at once.
function M.request_ack(session)
	local conn = session.conn
	if conn and not session.offline_nodelay and conn.setoption then
		session.offline_nodelay = true
		pcall(conn.setoption, conn, "tcp-nodelay", true)
	end
	session.send(st.stanza("r", { xmlns = session.smacks }))
end

-- The host's offline_store.drain, with pages of `page` messages.
function Host:drainer(page)
	local m, host = self.metrics, self.host
	return drain.new {
		host = host,
		page = page,
		lease = self.settings.lease,
		owner_prefix = self:owner_prefix(),
		delay_text = policy.DELAY_TEXT,
		now_us = function() return self:now_us() end,
		db = function()
			local batch, err = self:usable_batch()
			if not batch then return nil, err end
			return batch:idle()
		end,
		deliver = function(item) return policy.delivery(item, host) end,
		set_aside = function(username, item, why) return self:set_aside(username, item, why) end,
		later = self.later,
		request_ack = M.request_ack,
		log = self.log,
		delivered = function(n, session)
			m.delivered:add(n)
			self.ev:delivered(session, n)
		end,
		on_acked = function(session, n) self.ev:acked(session, n) end,
		failed = function(operation) m.failed:with_labels(operation):add(1) end,
		timed = m.timed and function(us) m.pop:sample(us / 1000000) end or nil,
	}
end

-- The cfg of offline_store.flexible.setup: XEP-0013 on the store and delivery of
-- `drainer` (this host's offline_store.drain); bare_sessions: prosody.bare_sessions.
function Host:flexible_cfg(drainer, bare_sessions)
	local host = self.host
	return {
		host = host, db = drainer.db, now_us = function() return self:now_us() end, later = drainer.later,
		log = drainer.log, deliver = drainer.deliver, set_aside_meta = self.core.SET_ASIDE,
		sessions = function(username)
			local user = bare_sessions[username .. "@" .. host]
			return user and user.sessions
		end,
		on = function() return self.settings.flexible end,
		from_recipient = function(origin, username) return self:from_recipient(origin, username) end,
		recipient = policy.recipient,
	}
end

--- Drop-in: what Prosody's bundled mod_offline queued (its "offline" archive store, on
--- the host's storage) moves into this store at start (offline_store.migrate), once,
--- before any queue is delivered. Returns true when there is nothing left to try.
function Host:import_bundled()
	if self.imported then return true end
	local batch = self:usable_batch()
	if not batch then return false end -- (PostgreSQL away since the start: tried at the next login)
	self.imported = true
	local migrate = require "offline_store.migrate"
	local archive, err = migrate.bundled_store(self.host)
	local ok, msg, found = false, err, 0
	if archive then
		local _
		ok, msg, _, _, found = migrate.import(batch:idle(), archive, self.host)
	end
	self.log(not ok and "error" or found > 0 and "info" or "debug", "%s", msg)
	return true
end

--- Leases do not outlive their holder: at start, every lease of this node and
--- host is released (a crash or kill left them); a live node renews its own.

-- The lease owners of this host start with this: its node, then the host.
function Host:owner_prefix()
	return self.settings.node .. " " .. self.host .. " "
end

-- sessions: prosody.full_sessions; drainer: the host's offline_store.drain.
function Host:release_at_start(sessions, drainer)
	local reloaded = false
	for _, session in pairs(sessions) do
		if session.host == self.host and session.offline_drain then
			-- a module reload: the leases are live sessions'; their timers went with the old module
			reloaded = true
			session.offline_drain.scheduled = false
			drainer:schedule(session)
		end
	end
	if reloaded then return end
	local batch = self:usable_batch()
	if not batch then return end
	local n, err, code = batch:idle():release_all(self:owner_prefix())
	if n and n > 0 then
		self.log("info", "Released %d offline messages leased before the restart; they are queued again", n)
	elseif code == tonumber("55P03", 36) then -- (postgres: held by a live process, see doc/manual.md)
		self.log("error", "Another running server uses offline_node = %q with this database: its leases "
			.. "are left alone; give each server its own offline_node (%s)", self.settings.node, tostring(err))
	elseif not n then
		self.log("error", "Releasing the offline messages leased before the restart failed: %s", tostring(err))
	end
end

-- Returns the seconds until the next renewal.
function Host:renew()
	local batch = self:usable_batch()
	local lease = self.settings.lease
	if batch then
		local n, err = batch:idle():renew(self:owner_prefix(), self:now_us() + lease * 1000000)
		if not n then self.log("error", "Renewing offline message leases failed: %s", tostring(err)) end
	end
	return lease / 3
end

--- Removal with the account, and the periodic sweep (expired messages, and
--- queues of accounts deleted behind the server's back, e.g. 0.12's
--- `prosodyctl deluser`, which runs in its own process).

function Host:remove_user(username)
	local host = self.host
	if not self:usable_batch() then return end
	local n, err = self.b:idle():remove_user(host, username)
	if n then
		self.log("debug", "Removed %d offline messages of deleted user %s@%s", n, username, host)
	else
		self.metrics.failed:with_labels("remove"):add(1)
		self.log("error", "Removing offline messages of deleted user %s@%s failed: %s", username, host, err)
	end
end

-- user_exists(user, host): the server's account check.
function Host:sweep(user_exists)
	if not self:usable_batch() then return end -- (PostgreSQL away since the start)
	-- (through the stand-in: user_exists may wait, and stores may come meanwhile)
	local ok, msg = admin.expire(self.guarded, self:now_us())
	self.log(ok and "info" or "error", "Expiry sweep: %s", msg)
	local ok2, msg2, queues = admin.orphans(self.guarded, self.host, user_exists)
	self.log(ok2 and "info" or "error", "Orphaned queues: %s%s", msg2, queues and (" from " .. queues .. " deleted accounts") or "")
end

return M
