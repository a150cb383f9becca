-- mod_offline: XEP-0160 offline messages on the offline-store C core.
-- Shadows Prosody's bundled mod_offline through plugin_paths. Thin on purpose:
-- read options, hook events, ask offline_store.policy/.limits/.admin, send stanzas.
-- Loaded on host "*" by `prosodyctl mod_offline ...` it only provides module.command.
-- doc/manual.md describes every option and command.

local jid_bare = require "util.jid".bare
local time_now = require "util.time".now
local configmanager = require "core.configmanager"
local st = require "util.stanza"

local floor, type, tostring, pairs, ipairs = math.floor, type, tostring, pairs, ipairs
local host = module.host

--- Finding our Lua modules and the C library (Prosody strips relative cpath
--- entries and never puts the installer's lib dir on cpath).
local dir = module:get_directory()

if not package.searchpath("offline_store.policy", package.path) then
	package.path = dir .. "/?.lua;" .. dir .. "/?/init.lua;" .. package.path
end

-- Why the module is not running on a host, for the shell; and the shell's
-- `offline` commands, there even when the load fails below, so that they say why.
local problems = module:shared("/*/offline/problems")
problems[host] = nil
if host ~= "*" then
	local shell = require "offline_store.shell"
	local shell_state = module:shared("/*/offline/shell")
	local env = module:shared("/*/admin_shell/env")
	env.offline = shell.new(module:shared("/*/offline/stores"), problems,
		prosody.hosts, require "core.usermanager".user_exists)
	-- 13's shell runs `prosodyctl shell offline count ...` only for commands given to it as
	-- "shell-command" items. They go to its process-wide registry (the event a global
	-- module's add_item fires): a host module's items would be per-host commands, whose
	-- dispatcher neither normalises the JID nor says why the module is not loaded, and
	-- which leave with that host's module. 0.12's shell takes no items: its `help` is wrapped.
	local function register()
		for _, item in ipairs(shell.items(env.offline)) do
			prosody.events.fire_event("item-added/shell-command", { source = module, item = item })
		end
		if not getmetatable(env.offline) then
			shell.add_help(module:shared("/*/admin_shell/commands"), shell_state)
		end
	end
	register()
	module:hook_global("module-loaded", function(event) if event.module == "admin_shell" then register() end end)
end

--- A host: a bad option or a missing library stops the module with a message
--- that names it, rather than letting it run misconfigured.
local function refuse(msg)
	module:log("error", "%s; mod_offline is not loaded on %s", msg, host)
	problems[host] = msg
	error(msg, 0)
end

local function file_exists(path)
	local f = io.open(path, "rb")
	if f then f:close() end
	return f ~= nil
end

-- Returns the offline_store.core module, or raises naming every place looked at.
local function load_core()
	if package.loaded["offline_store.core"] then return package.loaded["offline_store.core"] end
	local explicit = module:get_option_path("offline_library_path", nil, "config")
	local candidates = explicit and { explicit } or {
		dir .. "/offline_store/core.so", -- next to the plugin
		dir .. "/../build/offline_store/core.so", -- a source checkout: lua/ beside build/
		dir .. "/../../../lib/lua/5.4/offline_store/core.so", -- a LuaRocks tree: share/lua/5.4 -> lib/lua/5.4
		prosody.paths.installer and (prosody.paths.installer .. "/lib/lua/5.4/offline_store/core.so"),
	}
	local tried = {}
	for _, path in pairs(candidates) do
		if file_exists(path) then
			local open, err = package.loadlib(path, "luaopen_offline_store_core")
			if not open then error(("offline_library_path: cannot load %s: %s"):format(path, err), 0) end
			package.loaded["offline_store.core"] = open("offline_store.core")
			module:log("debug", "Loaded offline_store.core from %s", path)
			return package.loaded["offline_store.core"]
		end
		tried[#tried + 1] = path
	end
	if explicit then
		error(("offline_library_path: no such file %s"):format(explicit), 0)
	end
	local ok, core = pcall(require, "offline_store.core")
	if ok then return core end
	error("cannot find offline_store/core.so (looked in " .. table.concat(tried, ", ")
		.. " and package.cpath); set offline_library_path to its absolute path", 0)
end

local core_loaded, core = pcall(load_core)
if not core_loaded then
	if host ~= "*" then refuse(core) end
	error(core, 0)
end
local offline_store = require "offline_store"
local policy = require "offline_store.policy"
local times = policy.times
local limits = require "offline_store.limits"
local admin = require "offline_store.admin"
local options = require "offline_store.options"

--- Options, read for any host so prosodyctl can use them too.
--- Returns a settings table, or nil and an error that names the option.
local function read_options(h)
	return options.read(function(name) return configmanager.get(h, name) end, prosody.paths.data)
end

local function open_store(h, s)
	local db, err = offline_store.open(s.store)
	if db then return db end
	return nil, ("cannot open the %s offline store of %s%s: %s"):format(s.store.backend, h,
		s.store.file and (" (offline_sqlite_file = " .. s.store.file .. ")") or "", err)
end

--- `prosodyctl mod_offline <command> ...`: runs in prosodyctl's own process,
--- on the sqlite file, safe next to a running server (busy timeout, WAL).
if host == "*" then
	local USAGE = [[
Usage: prosodyctl mod_offline <command>
  count user@host        show how many messages are queued
  list user@host [max]   list queued messages (oldest first)
  delete user@host       delete a user's queue
  expire host            delete expired messages (every host in that host's store)
  purge host days        delete messages older than days (>= 1)
  orphans host           delete the queues of users that no longer exist]]

	local function with_store(name, fn)
		local h, herr = admin.host(name, prosody.hosts)
		if not h then return nil, herr end
		local s, err = read_options(h)
		if not s then return nil, err end
		if s.store.backend == "memory" then
			return nil, "the memory backend lives inside the running server; use `prosodyctl shell offline ...`"
		end
		local db, oerr = open_store(h, s)
		if not db then return nil, oerr end
		local ok, msg = fn(db, h)
		db:close()
		return ok, msg
	end

	local function command(arg)
		local cmd, a1, a2 = arg[1], arg[2], arg[3]
		local function by_jid(fn)
			local user, h = admin.user_jid(a1, prosody.hosts)
			if not user then return nil, h end
			return with_store(h, function(db) return fn(db, user, h) end)
		end
		if cmd == "count" then
			return by_jid(admin.count)
		elseif cmd == "list" then
			return by_jid(function(db, user, h) return admin.list(db, user, h, print, a2) end)
		elseif cmd == "delete" then
			return by_jid(admin.delete)
		elseif cmd == "expire" then
			return with_store(a1, function(db) return admin.expire(db) end)
		elseif cmd == "purge" then
			local days, err = admin.days(a2)
			if not days then return nil, err end
			return with_store(a1, function(db) return admin.purge(db, days) end)
		elseif cmd == "orphans" then
			local user_exists = require "util.prosodyctl".user_exists
			return with_store(a1, function(db, h)
				return admin.orphans(db, h, function(user) return user_exists { user = user, host = h } end)
			end)
		end
		return nil, nil
	end

	function module.command(arg)
		local ok, msg = command(arg)
		if ok then print(msg); return 0 end
		if msg then print("Error: " .. msg) else print(USAGE) end
		return 1
	end
	return
end

--- A host: options validated at load, and again at each config reload.
local settings, settings_err = read_options(host)
if not settings then refuse(settings_err) end
local store_groupchat = settings.groupchat

-- Admins (the `admin` ACL of the limit rules): roles on 13 (module:may), is_admin on 0.12. Asked only
-- when a recipient's limit is not remembered (below).
local is_admin
if module.may and require "core.features".available:contains("permissions") then
	module:default_permission("prosody:admin", ":unlimited-offline")
	is_admin = function(bare) return module:may(":unlimited-offline", bare) == true end
else
	local usermanager = require "core.usermanager"
	is_admin = function(bare) return usermanager.is_admin(bare, host) == true end
end

-- The limit function of settings `s` under the current `access` and `acl`.
local function compile_limits(s)
	return limits.compile(s.rule_name, module:get_option("access"), module:get_option("acl"), is_admin)
end
local limit_uncached, limit_err = compile_limits(settings)
if not limit_uncached then refuse(limit_err) end

-- The store is opened here, before any hook exists: one that cannot be opened
-- stops the module before it handles anything (Prosody then bounces messages
-- to offline users itself), whereas a failure in module.load would leave the
-- hooks running without a store. PostgreSQL away at start is the exception:
-- the module comes up, answers stores with the storage-failure error and
-- opens the store on use once the database is back (see usable_batch below).
local opened, open_err = open_store(host, settings)
if not opened and settings.store.backend ~= "postgres" then refuse(open_err) end

-- Every store asks for the recipient's limit (0.12's admin check reads
-- storage): remembered per recipient (-1 for "infinity") until the config is
-- reloaded, for up to LIMITS_KEPT recipients, then afresh. Kept in C, off the
-- Lua heap: a Lua table of one entry per recipient made Prosody's collector
-- touch every key on every cycle, which at 10,000 recipients cost more than
-- the store (doc/performance.md).
local LIMITS_KEPT = 50000
local limits_seen = core.cache(LIMITS_KEPT)
local function limit_for(username)
	local v = limits_seen:get(username)
	if v == nil then
		v = limit_uncached(username .. "@" .. host) or -1
		limits_seen:set(username, v)
	end
	if v >= 0 then return v end
end

-- What an operator should hear about at load and after a reload: misspelt
-- options, a rule named but not defined, and one line saying what runs.
local function report(s, what)
	local config = configmanager.getconfig()
	for _, warning in ipairs(options.unknown(config[host], config["*"])) do module:log("warn", "%s", warning) end
	local rule, defined = limits.describe(s.rule_name, module:get_option("access"))
	if s.rule_named and not defined then
		module:log("warn", "offline_access_max_user_messages names the rule %q, which the access option does not define;"
			.. " the built-in default applies", s.rule_name)
	end
	module:log("info", "%s: %s; limits %s; expiry sweep %s", what, options.where(s.store), rule, s.sweep or "off")
end
report(settings, "Offline messages (this mod_offline, not the bundled one)")

-- Rejections and failures, at a level an operator sees, one line a minute per kind.
local notice = require "offline_store.ratelog".new(function(...) module:log(...) end, 60, time_now)

--- Metrics: the seed's histograms, timing each backend call, and counters.
--- No-ops unless the global `statistics` option is set.
-- A fresh table each time: Prosody appends +Inf to the table it is given.
local function buckets() return { 0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3 } end
local m_write = module:metric("histogram", "write_messages", "seconds",
	"Time of each offline store write", {}, { buckets = buckets() }):with_labels()
local m_pop = module:metric("histogram", "pop_messages", "seconds",
	"Time of each offline delivery: the queue's check at login, then each page read and sent", {},
	{ buckets = buckets() }):with_labels()
local m_stored = module:metric("counter", "stored", "", "Messages stored offline", {}):with_labels()
local m_delivered = module:metric("counter", "delivered", "", "Offline messages delivered", {}):with_labels()
local m_rejected = module:metric("counter", "rejected_by_limit", "",
	"Messages rejected because the recipient's queue was full", {}):with_labels()
local m_dropped = module:metric("counter", "dropped_by_policy", "",
	"Messages deliberately not stored", { "reason" })
local m_failed = module:metric("counter", "failed", "", "Offline store calls that failed", { "operation" })
-- With statistics off every metric is Prosody's stand-in, whose fields are all
-- itself: the clock is then not read around every store and pop.
local timed = type(m_write.sample) == "function"

--- The store: opened at load, closed at unload. A memory store is handed over
--- across a module reload so its messages survive it.
local db
local handed_over = false

-- Every host's open store, for the live shell's commands (each a stand-in that
-- commits the host's open batch before any call).
local stores = module:shared("/*/offline/stores")

local function now_us() return floor(time_now() * 1000000) end

--- Group commit (offline_store.batch): messages stored while handling what has
--- arrived share one transaction, committed before anything leaves the server.
--- A reply, a stream management ack or a delivery can therefore never tell
--- anyone about a message that a crash could still lose; and one commit (one
--- WAL write and sync) serves many messages. Backends without transactions
--- (memory) store each message at once.
local batch = require "offline_store.batch"
local filters = require "util.filters"
local BATCH_MAX = 256

-- Process-wide: the batches open on any host, and one "stanzas/out" filter on
-- every session that commits them before the stanza is written. Installed by the
-- first host that loads the module, kept for the life of the process (it costs a
-- next() on an empty table when nothing is open).
local group = module:shared("/*/offline/group_commit")
group.open = group.open or {}
if not group.filter then
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

local b, guarded -- the batch over db, and the stand-in for db that flushes it first

local function tell_sender(stanza, reply)
	if stanza.attr.from then module:send(reply) end
end

local function attach(new_db)
	db = new_db
	local this
	this = batch.new(db, {
		max = BATCH_MAX,
		on_open = function()
			group.open[this] = true
			module:add_timer(0, function() this:flush() end) -- at the latest, the next loop turn
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
		on_commit = function(n)
			m_stored:add(n)
			module:log("debug", "Committed %d offline messages", n)
		end,
		on_lost = function(lost, err, code)
			m_failed:with_labels("write"):add(#lost)
			notice:line("failed", "error", "Committing %d offline messages failed: %s (code %s); their senders are told",
				#lost, err, tostring(code))
			for _, stanza in ipairs(lost) do tell_sender(stanza, policy.failure_error(stanza)) end
		end,
	})
	b, guarded = this, this:guarded()
	stores[host] = guarded
end

-- A store that could not be opened at load (PostgreSQL away) is tried again
-- when a message or a login needs it, at most once every REOPEN_EVERY seconds:
-- each try blocks for up to the connection timeout (connect_timeout, 2 s
-- unless offline_postgres sets it).
local REOPEN_EVERY = 5
local reopen_at = 0

-- The batch over the store, or nil and why there is none.
local function usable_batch()
	if b then return b end
	local t = time_now()
	if t < reopen_at then return nil, open_err end
	reopen_at = t + REOPEN_EVERY
	local new_db, err = open_store(host, settings)
	if not new_db then
		open_err = err
		return nil, err
	end
	attach(new_db)
	module:log("info", "Offline store open after all: %s", tostring(db))
	return b
end

-- Rows kept by earlier versions under "HOST!unparsable" (no limit, kept past
-- the account): moved into their users' queues as set-aside rows (see
-- set_aside below), once. Costs one look-up at load when there are none. Run
-- from the loop, not at load: Prosody -D forks after loading modules, and a
-- daemon does not inherit the locks sqlite takes on its first read.
local function adopt_unparsable()
	local db_ = guarded
	if not db_ then return end
	local old = host .. "!unparsable"
	for _, u in ipairs(db_:users(old) or {}) do
		local items = db_:list(old, u.user)
		local moved = items ~= nil -- (a failed list moves nothing and removes nothing)
		for _, item in ipairs(items or {}) do
			moved = db_:store(host, u.user, item.from, item.xml, item.ts, item.expire, nil, nil, core.SET_ASIDE)
				and moved
		end
		if moved and db_:remove_user(old, u.user) then
			module:log("info", "Moved %d undeliverable offline messages of %s@%s from %q into their queue, set aside",
				#items, u.user, host, old)
		end
	end
end

function module.load()
	if not db then -- (else: restored from a reload)
		if opened then
			attach(opened)
			module:add_timer(0, adopt_unparsable)
		else
			reopen_at = time_now() + REOPEN_EVERY
			module:log("error", "%s; until it opens (tried again on use, at most every %d s) messages "
				.. "to offline users get the storage-failure error", open_err, REOPEN_EVERY)
		end
	end
	module:log("debug", "Offline store open: %s", tostring(db))
end

function module.save()
	if b then b:flush() end
	if settings.store.backend == "memory" then
		handed_over = true
		return { db = db }
	end
end

function module.restore(data)
	if data.db and settings.store.backend == "memory" then
		if db then db:close() end
		attach(data.db)
	elseif data.db then
		data.db:close()
	end
end

function module.unload()
	if b then
		b:flush()
		group.open[b] = nil
		if stores[host] == guarded then stores[host] = nil end
	end
	if db and not handed_over then db:close() end
	db, b, guarded = nil, nil, nil
end

-- Nothing handled before shutdown stays uncommitted.
module:hook_global("server-stopping", function() if b then b:flush() end end)

module:add_feature("msgoffline")

--- Storing.

-- True when the event came from the recipient's own session (mod_smacks
-- re-queueing unacked messages): errors then go back through the caller.
local function from_recipient(origin, username)
	return origin ~= nil and origin.username == username and origin.host == host
end

-- One store: through the batch, or (a re-queue) at once on the idle db.
local function put(requeued, stanza, username, from, xml, ts, expire, limit, dedup)
	local batch, err = usable_batch()
	if not batch then return nil, err, 0 end
	if requeued then return batch:idle():store(host, username, from, xml, ts, expire, limit, nil, nil, dedup) end
	return batch:store(stanza, host, username, from, xml, ts, expire, limit, nil, nil, dedup)
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
local function store_message(origin, stanza, username)
	-- Delay stamps are believed only on messages the server re-queues from the
	-- recipient's own session (mod_smacks): a sender can forge any `from`.
	local requeued = from_recipient(origin, username)
	local ts, expire = times(stanza, now_us(),
		requeued and { [host] = true, [username .. "@" .. host] = true } or nil)
	local from, limit = stanza.attr.from or "", limit_for(username)
	local dedup = dedup_of(stanza, from)
	local started = timed and time_now()
	local count, why, current = put(requeued, stanza, username, from, stanza, ts, expire, limit, dedup)
	if count == false and why == "too deep" then
		count, why, current = put(requeued, stanza, username, from, policy.stored_xml(stanza), ts, expire, limit, dedup)
	end
	if started then m_write:sample(time_now() - started) end
	if count == false and why == "duplicate" then
		m_dropped:with_labels("duplicate"):add(1)
		module:log("debug", "Not storing a message for %s@%s again (same origin-id from the same sender)", username, host)
		return true
	end
	if count then
		-- (a batched store is counted, and logged, when its batch commits)
		if requeued or b.unbatched then
			m_stored:add(1)
			module:log("debug", "Stored offline message for %s@%s (%d queued)", username, host, count)
		end
		return true
	end
	if count == false then
		m_rejected:add(1)
		notice:line("rejected", "warn", "Offline queue of %s@%s is full (%d messages); a message was rejected", username, host, current)
		if requeued then return nil end
		tell_sender(stanza, policy.limit_error(stanza))
		return true
	end
	m_failed:with_labels("write"):add(1)
	notice:line("failed", "error", "Storing an offline message for %s@%s failed: %s (code %s)", username, host, why, tostring(current))
	if requeued then return nil end
	tell_sender(stanza, policy.failure_error(stanza))
	return true
end

-- Returns the handler's result for a message offered for storage.
local function offer(origin, stanza, username)
	local action, reason = policy.classify(stanza, store_groupchat)
	if action == "store" then return store_message(origin, stanza, username) end
	m_dropped:with_labels(reason):add(1)
	if action == "bounce" then
		if from_recipient(origin, username) then return nil end
		module:log("debug", "Bouncing %s message to offline %s@%s", reason, username, host)
		tell_sender(stanza, policy.bounce_error(stanza))
		return true
	end
	module:log("debug", "Not storing a %s message for %s@%s", reason, username, host)
	return true
end

local drainer -- (Delivery, below)

module:hook("message/offline/handle", function(event)
	local stanza = event.stanza
	if not stanza then return nil end
	local username = event.username or policy.recipient(event)
	if not username then return nil end
	local origin = event.origin
	-- a row leased to the recipient's own session, re-fired by some module: the lease keeps it
	if origin and origin.offline_drain and from_recipient(origin, username) and drainer:failure(origin, stanza) then
		return true
	end
	return offer(origin, stanza, username)
end, -1)

-- Groupchat to a bare JID reaches us here, not through message/offline/handle.
module:hook("message/bare/groupchat", function(event)
	local stanza = event.stanza
	local to = stanza.attr.to
	local bare = to and jid_bare(to)
	local user = bare and prosody.bare_sessions[bare]
	if user and user.top_resources and #user.top_resources > 0 then
		if not store_groupchat then return nil end -- online: the usual bounce
		local sent
		for _, session in pairs(user.top_resources) do sent = session.send(stanza) or sent end
		if sent then return true end
	end
	return offer(event.origin, stanza, policy.recipient(event))
end, -1)

--- Delivery.

-- A row that cannot be turned back into a stanza (damaged, or written by
-- another program) is set aside once: stored again in the recipient's own
-- queue with core.SET_ASIDE as its meta, which pop skips from then on. It
-- counts toward their limits, shows in `offline list` and goes with delete,
-- purge, expiry and the account; it is never retried nor logged again.
local SET_ASIDE = core.SET_ASIDE

local function set_aside(username, item, why)
	local n, id_or_err, code = b:idle():store(host, username, item.from, item.xml, item.ts, item.expire,
		nil, nil, SET_ASIDE)
	m_failed:with_labels("deliver"):add(1)
	if n then
		module:log("error", "Offline message %d for %s@%s cannot be delivered (%s); set aside in their queue "
			.. "as message %d (`offline list`)", item.id, username, host, tostring(why), id_or_err)
		return true
	end
	module:log("error", "Offline message %d for %s@%s cannot be delivered (%s), and setting it aside "
		.. "failed: %s (code %s)", item.id, username, host, tostring(why), id_or_err, tostring(code))
	return false
end

-- The user's queue goes to a session that comes online a page at a time
-- (offline_store.drain): with XEP-0198 each page is leased and its rows deleted
-- when the client acks them; without it, popped and written. What is here is
-- the wiring to Prosody's events.
local drain = require "offline_store.drain"

-- The lease owners of this host start with this: its node, then the host.
local owner_prefix = settings.node .. " " .. host .. " "

-- A page above half of mod_smacks' queue could make its queue overflow
-- (with live traffic on top), which loses resumption.
local function page_size(s)
	local smacks_queue = module:get_option_number("smacks_max_queue_size", 500)
	local limit = math.max(1, smacks_queue // 2)
	if s.page > limit then
		module:log("warn", "offline_delivery_page = %d is more than half of smacks_max_queue_size (%d); using %d",
			s.page, smacks_queue, limit)
		return limit
	end
	return s.page
end

drainer = drain.new {
	host = host,
	page = page_size(settings),
	lease = settings.lease,
	owner_prefix = owner_prefix,
	delay_text = policy.DELAY_TEXT,
	now_us = now_us,
	db = function()
		local batch, err = usable_batch()
		if not batch then return nil, err end
		return batch:idle()
	end,
	deliver = function(item) return policy.delivery(item, host) end,
	set_aside = function(username, item, why) return set_aside(username, item, why) end,
	later = function(secs, fn) module:add_timer(secs, fn) end,
	request_ack = function(session)
		-- The <r/> closes a page: a small write right behind a large one, which
		-- Nagle's algorithm would hold until the client's delayed ACK (40 ms on
		-- Linux), for every page. Prosody leaves Nagle on by default; a
		-- session being drained asks for its writes to go out at once.
		local conn = session.conn
		if conn and not session.offline_nodelay and conn.setoption then
			session.offline_nodelay = true
			pcall(conn.setoption, conn, "tcp-nodelay", true)
		end
		session.send(st.stanza("r", { xmlns = session.smacks }))
	end,
	log = function(...) module:log(...) end,
	delivered = function(n) m_delivered:add(n) end,
	failed = function(operation) m_failed:with_labels(operation):add(1) end,
	timed = timed and function(us) m_pop:sample(us / 1000000) end or nil,
}

module:hook("message/offline/broadcast", function(event)
	local started = timed and time_now()
	drainer:start(event.origin)
	if started then m_pop:sample(time_now() - started) end
	return true
end, -1)

-- mod_smacks handles <a/> itself and stops the event there; a wrapper sees its
-- queue right after it did.
local function after_ack(handlers, event_name, event_data)
	local ret = handlers(event_name, event_data)
	local session = event_data.origin
	if session and session.offline_drain then drainer:acked(session) end
	return ret
end
module:wrap_event("stanza/urn:xmpp:sm:3:a", after_ack)
module:wrap_event("stanza/urn:xmpp:sm:2:a", after_ack)

module:hook("smacks-hibernation-end", function(event)
	local session = event.resumed
	if session and session.offline_drain then drainer:resumed(session) end
end)

-- mod_smacks gives back the unacked stanzas of a session that ends; ours are
-- still stored (leased), and the release below queues them again as they were.
module:hook("delivery/failure", function(event)
	local session = event.session
	if session and session.offline_drain and drainer:failure(session, event.stanza) then return true end
end, 1)

module:hook("resource-unbind", function(event)
	local session = event.session
	if session and session.offline_drain then drainer:unbind(session) end
end)

module:hook("c2s-ondrain", function(event)
	local session = event.session
	if session and session.offline_drain then drainer:ondrain(session) end
end)

-- Leases do not outlive their holder: at start, every lease of this node and
-- host is released (a crash or kill left them); a live node renews its own.
local function release_at_start()
	local reloaded = false
	for _, session in pairs(prosody.full_sessions) do
		if session.host == host and session.offline_drain then
			-- a module reload: the leases are live sessions'; their timers went with the old module
			reloaded = true
			session.offline_drain.scheduled = false
			drainer:schedule(session)
		end
	end
	if reloaded then return end
	local batch = usable_batch()
	if not batch then return end
	local n, err, code = batch:idle():release_all(owner_prefix)
	if n and n > 0 then
		module:log("info", "Released %d offline messages leased before the restart; they are queued again", n)
	elseif code == tonumber("55P03", 36) then -- (postgres: held by a live process, see doc/manual.md)
		module:log("error", "Another running server uses offline_node = %q with this database: its leases "
			.. "are left alone; give each server its own offline_node (%s)", settings.node, tostring(err))
	elseif not n then
		module:log("error", "Releasing the offline messages leased before the restart failed: %s", tostring(err))
	end
end

local function renew()
	local batch = usable_batch()
	if batch then
		local n, err = batch:idle():renew(owner_prefix, now_us() + settings.lease * 1000000)
		if not n then module:log("error", "Renewing offline message leases failed: %s", tostring(err)) end
	end
	return settings.lease / 3
end
module:add_timer(0, release_at_start) -- (from the loop: see adopt_unparsable)
module:add_timer(settings.lease / 3, renew)

--- Removal with the account, and the periodic sweep (expired messages, and
--- queues of accounts deleted behind the server's back, e.g. 0.12's
--- `prosodyctl deluser`, which runs in its own process).
local usermanager = require "core.usermanager"

module:hook_global("user-deleted", function(event)
	if event.host ~= host or not usable_batch() then return end
	local n, err = b:idle():remove_user(host, event.username)
	if n then
		module:log("debug", "Removed %d offline messages of deleted user %s@%s", n, event.username, host)
	else
		m_failed:with_labels("remove"):add(1)
		module:log("error", "Removing offline messages of deleted user %s@%s failed: %s", event.username, host, err)
	end
end)

local function sweep()
	if not usable_batch() then return end -- (PostgreSQL away since the start)
	-- (through the stand-in: user_exists may wait, and stores may come meanwhile)
	local ok, msg = admin.expire(guarded, now_us())
	module:log(ok and "info" or "error", "Expiry sweep: %s", msg)
	local ok2, msg2, queues = admin.orphans(guarded, host, usermanager.user_exists)
	module:log(ok2 and "info" or "error", "Orphaned queues: %s%s", msg2, queues and (" from " .. queues .. " deleted accounts") or "")
end

local sweep_task
local function schedule_sweep(when)
	if sweep_task then module:remove_item("task", sweep_task) end
	sweep_task = when and { name = "expiry sweep", when = when, run = sweep }
	if sweep_task then module:cron(sweep_task) end
end
schedule_sweep(settings.sweep)

--- A config reload applies the options, `access` and `acl` at once; one bad
--- value keeps every running setting, and says which. A store setting takes
--- effect when the store is opened again.
module:hook_global("config-reloaded", function()
	local s, err = read_options(host)
	local limit
	if s then limit, err = compile_limits(s) end
	if not limit then
		module:log("error", "Config reload: %s; mod_offline on %s keeps its running settings", err, host)
		return
	end
	local changed = options.store_changes(settings.store, s.store)
	if #changed > 0 then
		module:log("warn", "Config reload: %s changed; the store keeps running as it is until the module is reloaded"
			.. " (prosodyctl shell module reload offline %s)", table.concat(changed, ", "), host)
		s.store = settings.store
	end
	if s.node ~= settings.node then
		module:log("warn", "Config reload: offline_node changed; it takes effect when the module is reloaded")
		s.node = settings.node
	end
	store_groupchat, limit_uncached = s.groupchat, limit
	drainer.page, drainer.lease_us = page_size(s), s.lease * 1000000
	limits_seen:clear()
	if s.sweep ~= settings.sweep then schedule_sweep(s.sweep) end
	settings = s
	report(s, "Config reloaded")
end)
