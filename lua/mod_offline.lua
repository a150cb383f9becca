-- mod_offline: XEP-0160 offline messages on the offline-store C core.
-- Shadows Prosody's bundled mod_offline through plugin_paths. Thin on purpose: read
-- options, hook events and hand them to offline_store.host (the work on one host) and
-- offline_store.drain (delivery). Loaded on host "*" by `prosodyctl mod_offline ...` it
-- only provides module.command. doc/manual.md describes every option and command;
-- doc/hacking.md lists the modules.

local jid_bare = require "util.jid".bare
local time_now = require "util.time".now
local configmanager = require "core.configmanager"
local usermanager = require "core.usermanager"

local host = module.host
local function log(...) module:log(...) end

-- Our Lua modules, next to the plugin (the C library: offline_store.loader).
local dir = module:get_directory()
if not package.searchpath("offline_store.policy", package.path) then
	package.path = dir .. "/?.lua;" .. dir .. "/?/init.lua;" .. package.path
end

-- Why the module is not running on a host, and the shell's `offline` commands: there
-- even when the load fails below, so that they say why.
local problems = module:shared("/*/offline/problems")
problems[host] = nil
if host ~= "*" then require "offline_store.shell".install(module, prosody, usermanager.user_exists) end

-- A bad option or a missing library stops the module with a message that names it.
local function refuse(msg)
	module:log("error", "%s; mod_offline is not loaded on %s", msg, host)
	problems[host] = msg
	error(msg, 0)
end

local core_loaded, core = pcall(require "offline_store.loader".load, dir,
	module:get_option_path("offline_library_path", nil, "config"), prosody.paths.installer, log)
if not core_loaded then
	if host ~= "*" then refuse(core) end
	error(core, 0)
end
local policy = require "offline_store.policy"
local limits = require "offline_store.limits"
local options = require "offline_store.options"

local function read_options(h)
	return options.read(function(name) return configmanager.get(h, name) end, prosody.paths.data)
end

--- `prosodyctl mod_offline <command> ...`: runs in prosodyctl's own process.
if host == "*" then
	function module.command(arg)
		local user_exists = require "util.prosodyctl".user_exists
		return require "offline_store.command".prosodyctl(arg, { hosts = prosody.hosts, read_options = read_options,
			open = options.open_store, user_exists = function(user, h) return user_exists { user = user, host = h } end })
	end
	return
end

--- A host: options validated at load, and again at each config reload.
local settings, settings_err = read_options(host)
if not settings then refuse(settings_err) end

-- The `admin` ACL of the limit rules: roles on 13, is_admin on 0.12.
local is_admin
if module.may and require "core.features".available:contains("permissions") then
	module:default_permission("prosody:admin", ":unlimited-offline")
	is_admin = function(bare) return module:may(":unlimited-offline", bare) == true end
else
	is_admin = function(bare) return usermanager.is_admin(bare, host) == true end
end
local function compile_limits(s)
	return limits.for_settings(s, module:get_option("access"), module:get_option("acl"), is_admin)
end
local limit, limit_bytes = compile_limits(settings)
if not limit then refuse(limit_bytes) end

-- The store is opened before any hook exists: one that cannot be opened stops the module
-- (Prosody then bounces messages to offline users itself). PostgreSQL away at start is
-- the exception: stores get the storage-failure error until it opens (Host:usable_batch).
local opened, open_err = options.open_store(host, settings)
if not opened and settings.store.backend ~= "postgres" then refuse(open_err) end

local function report(s, what)
	local config = configmanager.getconfig()
	options.report(s, what, config[host], config["*"], module:get_option("access"), log)
end
report(settings, "Offline messages (this mod_offline, not the bundled one)")

local m = require "offline_store.metrics".new(function(...) return module:metric(...) end)
local group = module:shared("/*/offline/group_commit")
require "offline_store.group".install(group, require "util.filters", prosody)

-- The events for other modules (offline_store.events), XEP-0357 pushes for stored messages
-- only (offline_store.push), Prosody 13's disabled accounts (offline_store.disabled).
local events = require "offline_store.events"
require "offline_store.push".setup(module, events, prosody.hosts[host].events)

local h = require "offline_store.host".new {
	ev = events.new(prosody.hosts[host].events),
	is_disabled = require "offline_store.disabled".setup(module, core),
	host = host, settings = settings, core = core, limit = limit, limit_bytes = limit_bytes, metrics = m, group = group,
	stores = module:shared("/*/offline/stores"),
	open = function(s) return options.open_store(host, s) end,
	log = log,
	send = function(stanza) module:send(stanza) end,
	later = function(secs, fn) module:add_timer(secs, fn) end,
	now = time_now,
	notice = require "offline_store.ratelog".new(log, 60, time_now),
}

function module.load() h:load(opened, open_err) end
function module.save() return h:save() end
function module.restore(data) h:restore(data) end
function module.unload() h:unload() end

module:hook_global("server-stopping", function() h:flush() end) -- (nothing left uncommitted)

module:add_feature("msgoffline")

--- Storing.

local drainer -- (Delivery, below)

module:hook("message/offline/handle", function(event)
	local stanza, origin = event.stanza, event.origin
	local username = stanza and (event.username or policy.recipient(event))
	if not username then return nil end
	-- a row leased to the recipient's own session, re-fired by some module: the lease keeps it
	if origin and origin.offline_drain and h:from_recipient(origin, username) and drainer:failure(origin, stanza) then
		return true
	end
	return h:offer(origin, stanza, username)
end, -1)

-- Groupchat to a bare JID reaches us here, not through message/offline/handle.
module:hook("message/bare/groupchat", function(event)
	local to = event.stanza.attr.to
	local bare = to and jid_bare(to)
	return h:groupchat(event, bare and prosody.bare_sessions[bare])
end, -1)

--- Delivery, a page at a time (offline_store.drain): with XEP-0198 each page is leased
--- and its rows deleted when the client acks them; without it, popped and written.

local function page_size(s)
	return options.page_size(s, module:get_option_number("smacks_max_queue_size", 500), log)
end
drainer = h:drainer(page_size(settings))

module:hook("message/offline/broadcast", function(event)
	local started = m.timed and time_now()
	drainer:start(event.origin)
	if started then m.pop:sample(time_now() - started) end
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
-- still stored (leased), and the release queues them again as they were.
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

-- XEP-0013 Flexible Offline Message Retrieval: its own hooks (offline_store.flexible).
require "offline_store.flexible".setup(module, h:flexible_cfg(drainer, prosody.bare_sessions))

-- Leases left by a crash are released at start (from the loop: see Host:adopt_unparsable);
-- a live node renews its own.
module:add_timer(0, function() h:release_at_start(prosody.full_sessions, drainer) end)
module:add_timer(settings.lease / 3, function() return h:renew() end)

-- What Prosody's bundled mod_offline queued moves in at the loop's first turn, or at the
-- first login if that comes first.
module:add_timer(0, function() h:import_bundled() end)
module:hook("message/offline/broadcast", function() h:import_bundled() end, 1)

--- Removal with the account, and the periodic sweep of expired messages and orphaned queues.

module:hook_global("user-deleted", function(event)
	if event.host == host then h:remove_user(event.username) end
end)

local sweep_task
local function schedule_sweep(when)
	if sweep_task then module:remove_item("task", sweep_task) end
	sweep_task = when and { name = "expiry sweep", when = when, run = function() h:sweep(usermanager.user_exists) end }
	if sweep_task then module:cron(sweep_task) end
end
schedule_sweep(settings.sweep)

--- A config reload applies the options, `access` and `acl` at once; one bad value keeps
--- every running setting, and says which. A store setting takes effect when the store
--- is opened again.
module:hook_global("config-reloaded", function()
	local s, err = read_options(host)
	local new_limit, new_limit_bytes
	if s then new_limit, new_limit_bytes = compile_limits(s) end
	if not new_limit then
		module:log("error", "Config reload: %s; mod_offline on %s keeps its running settings", err or new_limit_bytes, host)
		return
	end
	options.keep_running(settings, s, host, log)
	h:set_limit(new_limit, new_limit_bytes)
	drainer.page, drainer.lease_us = page_size(s), s.lease * 1000000
	if s.sweep ~= settings.sweep then schedule_sweep(s.sweep) end
	settings, h.settings = s, s
	report(s, "Config reloaded")
end)
