-- mod_offline: XEP-0160 offline messages on the offline-store C core.
-- Shadows Prosody's bundled mod_offline through plugin_paths. Thin on purpose:
-- read options, hook events, ask offline_store.policy and .limits, send stanzas.
-- See README.md for every option.

local jid_bare = require "util.jid".bare
local time_now = require "util.time".now
local usermanager = require "core.usermanager"

local floor, type, tostring, pairs, ipairs = math.floor, type, tostring, pairs, ipairs
local host = module.host

--- Finding our Lua modules and the C library (Prosody strips relative cpath
--- entries and never puts the installer's lib dir on cpath).
local dir = module:get_directory()

if not package.searchpath("offline_store.policy", package.path) then
	package.path = dir .. "/?.lua;" .. dir .. "/?/init.lua;" .. package.path
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

load_core()
local offline_store = require "offline_store"
local policy = require "offline_store.policy"
local limits = require "offline_store.limits"

--- Options, validated at load: a bad one stops the module with a message that
--- names it, rather than letting it run misconfigured.
local function refuse(msg)
	module:log("error", "%s; mod_offline is not loaded on %s", msg, host)
	error(msg, 0)
end

local function option_string(name, default)
	local v = module:get_option(name, default)
	if type(v) ~= "string" then
		refuse(("%s must be a string (got %s)"):format(name, tostring(v)))
	end
	return v
end

local function option_boolean(name, default)
	local v = module:get_option(name, default)
	if type(v) ~= "boolean" then
		refuse(("%s must be true or false (got %s)"):format(name, tostring(v)))
	end
	return v
end

local backend_option = option_string("offline_backend", "sqlite")
local store_groupchat = option_boolean("offline_store_groupchat_messages", false)
local rule_name = option_string("offline_access_max_user_messages", limits.DEFAULT_RULE_NAME)

local backend, backend_err = offline_store.resolve_backend(backend_option, module:get_option("offline_postgres") ~= nil)
if not backend then refuse("offline_backend: " .. backend_err) end

local store_config = { backend = backend }
if backend == "sqlite" then
	store_config.file = module:get_option_path("offline_sqlite_file", "offline.sqlite", "data")
	store_config.synchronous = module:get_option("offline_sqlite_synchronous", "normal")
	store_config.busy_timeout = module:get_option("offline_sqlite_busy_timeout", 2000)
end
do
	local _, err = offline_store.check_config(store_config)
	if err then
		-- name the Prosody option, not the facade's field
		local names = { file = "offline_sqlite_file", synchronous = "offline_sqlite_synchronous",
			busy_timeout = "offline_sqlite_busy_timeout", backend = "offline_backend" }
		refuse((err:gsub("^(%w+)", function(field) return names[field] or field end)))
	end
end

-- Admins per SPEC §5: roles on 13 (module:may), is_admin on 0.12. Cached, as
-- 0.12's check reads storage; the cache is dropped when the config is reloaded.
local is_admin_uncached
if module.may and require "core.features".available:contains("permissions") then
	module:default_permission("prosody:admin", ":unlimited-offline")
	is_admin_uncached = function(bare) return module:may(":unlimited-offline", bare) end
else
	is_admin_uncached = function(bare) return usermanager.is_admin(bare, host) end
end
local admin_cache = {}
local function is_admin(bare)
	local v = admin_cache[bare]
	if v == nil then
		v = is_admin_uncached(bare) == true
		admin_cache[bare] = v
	end
	return v
end
module:hook_global("config-reloaded", function() admin_cache = {} end)

local limit_for, limit_err = limits.compile(rule_name, module:get_option("access"), module:get_option("acl"), is_admin)
if not limit_for then refuse(limit_err) end

--- The store: opened at load, closed at unload. A memory store is handed over
--- across a module reload so its messages survive it.
local db
local handed_over = false

local function now_us() return floor(time_now() * 1000000) end

function module.load()
	if db then return end -- restored from a reload
	local err
	db, err = offline_store.open(store_config)
	if not db then
		refuse(("cannot open the %s offline store%s: %s"):format(backend,
			store_config.file and (" (offline_sqlite_file = " .. store_config.file .. ")") or "", err))
	end
	module:log("debug", "Offline store open: %s", tostring(db))
end

function module.save()
	if backend == "memory" then
		handed_over = true
		return { db = db }
	end
end

function module.restore(data)
	if data.db and backend == "memory" then
		if db then db:close() end
		db = data.db
	elseif data.db then
		data.db:close()
	end
end

function module.unload()
	if db and not handed_over then db:close() end
	db = nil
end

module:add_feature("msgoffline")

--- Storing.

-- True when the event came from the recipient's own session (mod_smacks
-- re-queueing unacked messages): errors then go back through the caller.
local function from_recipient(origin, username)
	return origin ~= nil and origin.username == username and origin.host == host
end

-- Sends an error about `stanza` to its sender, unless there is nobody to tell.
local function tell_sender(stanza, reply)
	if stanza.attr.from then module:send(reply) end
end

local NO_ONE = {}

local function store_message(origin, stanza, username)
	local bare = username .. "@" .. host
	-- Delay stamps are believed only on messages the server re-queues from the
	-- recipient's own session (mod_smacks): a sender can forge any `from`.
	local trusted = from_recipient(origin, username) and { [host] = true, [bare] = true } or NO_ONE
	local xml, ts, expire = policy.prepare(stanza, now_us(), trusted)
	local count, why, current = db:store(host, username, stanza.attr.from or "", xml, ts, expire, limit_for(bare))
	if count then
		module:log("debug", "Stored offline message for %s (%d queued)", bare, count)
		return true
	end
	if count == false then
		module:log("debug", "Offline queue of %s is full (%d messages); rejected", bare, current)
		if from_recipient(origin, username) then return nil end
		tell_sender(stanza, policy.limit_error(stanza))
		return true
	end
	module:log("error", "Storing an offline message for %s failed: %s (code %s)", bare, why, tostring(current))
	if from_recipient(origin, username) then return nil end
	tell_sender(stanza, policy.failure_error(stanza))
	return true
end

-- Returns the handler's result for a message offered for storage.
local function offer(origin, stanza, username)
	local action, reason = policy.classify(stanza, store_groupchat)
	if action == "store" then return store_message(origin, stanza, username) end
	if action == "bounce" then
		if from_recipient(origin, username) then return nil end
		module:log("debug", "Bouncing %s message to offline %s@%s", reason, username, host)
		tell_sender(stanza, policy.bounce_error(stanza))
		return true
	end
	module:log("debug", "Not storing a %s message for %s@%s", reason, username, host)
	return true
end

module:hook("message/offline/handle", function(event)
	local stanza = event.stanza
	if not stanza then return nil end
	local username = policy.recipient(event)
	if not username then return nil end
	return offer(event.origin, stanza, username)
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

-- Keeps a stored row that no longer parses, under a key no real host can
-- have, so it is neither lost nor in the way; the operator can inspect it.
local QUARANTINE = host .. "!unparsable"

module:hook("message/offline/broadcast", function(event)
	local origin = event.origin
	local username = origin.username
	local items, err, code = db:pop(host, username, now_us())
	if not items then
		module:log("error", "Reading offline messages of %s@%s failed: %s (code %s); they stay stored",
			username, host, err, tostring(code))
		return true
	end
	for _, item in ipairs(items) do
		local stanza, perr = policy.delivery(item, host)
		if stanza then
			origin.send(stanza)
		else
			module:log("error", "Offline message %d for %s@%s no longer parses (%s); kept aside under %q",
				item.id, username, host, perr, QUARANTINE)
			db:store(QUARANTINE, username, item.from, item.xml, item.ts, nil, nil, nil, item.meta)
		end
	end
	if #items > 0 then
		module:log("debug", "Delivered %d offline messages to %s", #items, origin.full_jid or username)
	end
	return true
end, -1)

--- Removal with the account.
module:hook_global("user-deleted", function(event)
	if event.host ~= host or not db then return end
	local n, err = db:remove_user(host, event.username)
	if n then
		module:log("debug", "Removed %d offline messages of deleted user %s@%s", n, event.username, host)
	else
		module:log("error", "Removing offline messages of deleted user %s@%s failed: %s", event.username, host, err)
	end
end)
