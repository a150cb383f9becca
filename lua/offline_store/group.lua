-- offline_store.group: the process-wide side of group commit (offline_store.batch).
-- Messages stored while handling what has arrived share one transaction, committed
-- before anything leaves the server: a reply, a stream management ack or a delivery can
-- therefore never tell anyone about a message that a crash could still lose; and one
-- commit (one WAL write and sync) serves many messages. Backends without transactions
-- (memory) store each message at once.
--
-- `group` is a table shared by every host of the process (module:shared): group.open
-- holds the batches open on any host, group.filter the one "stanzas/out" filter on every
-- session that commits them before a stanza is written.

local batch = require "offline_store.batch"

local next, pairs = next, pairs

local _ENV = nil
-- luacheck: std none

local M = {}

-- Installs the filter once per process, on every session to come (filters: util.filters)
-- and on those already there (prosody: full_sessions, incoming_s2s, hosts[*].s2sout).
-- It is kept for the life of the process: it costs a next() on an empty table when
-- nothing is open.
function M.install(group, filters, prosody)
	group.open = group.open or {}
	if group.filter then return end
	local open = group.open
	function group.filter(stanza)
		if next(open) ~= nil then
			for b in pairs(open) do b:flush() end
		end
		return stanza
	end
	local function add(session) filters.add_filter(session, "stanzas/out", group.filter, 1000) end
	filters.add_filter_hook(add)
	-- sessions that were there before this module (loaded into a running server)
	for _, session in pairs(prosody.full_sessions) do add(session) end
	for session in pairs(prosody.incoming_s2s) do add(session) end
	for _, h in pairs(prosody.hosts) do
		for _, session in pairs(h.s2sout or {}) do add(session) end
	end
end

-- A batch over `db` that is in group.open while it is open, flushed at the latest on
-- the next loop turn (later(fn) runs fn then), and that commits the other hosts'
-- batches before it writes (they may share the file and hold its write lock).
-- opts: max, later, on_commit, on_lost, on_stored, on_refused (as for offline_store.batch).
function M.batch(group, db, opts)
	local this
	this = batch.new(db, {
		max = opts.max,
		on_open = function()
			group.open[this] = true
			opts.later(function() this:flush() end) -- at the latest, the next loop turn
		end,
		on_close = function() group.open[this] = nil end,
		-- other hosts may share the file: their open batches hold its write lock
		before_write = function()
			if next(group.open) ~= nil then
				for other in pairs(group.open) do
					if other ~= this then other:flush() end
				end
			end
		end,
		on_commit = opts.on_commit,
		on_lost = opts.on_lost,
		on_stored = opts.on_stored,
		on_refused = opts.on_refused,
	})
	return this
end

return M
