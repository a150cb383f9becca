-- offline_store.push: XEP-0357 push notifications through mod_cloud_notify, for messages
-- that are stored and only for those.
--
-- mod_cloud_notify pushes from message/offline/handle and message/bare/groupchat at
-- priority 1, before this module decides whether to store (so a message over the limit,
-- chat-state-only or no-store woke the phone all the same). While one of those events runs,
-- its push for that message is vetoed through mod_cloud_notify's own cloud_notify/push
-- event; once the message is stored (offline-store/stored: after its batch commits),
-- mod_cloud_notify's handler of that event runs again for the stored stanza, so the push
-- is the one it normally sends. A session that ends with delivered messages unacknowledged
-- (they go back to the queue) gets one push for all of them (cloud-notify-ping).
--
--   push.setup(module, events, host_events)   module: mod_offline's; events: offline_store.events;
--   host_events: prosody.hosts[host].events
-- Costs nothing per offline message while mod_cloud_notify is not loaded on the host: the
-- wrappers and hooks are in place only while it is.

local pairs, ipairs, setmetatable, require = pairs, ipairs, setmetatable, require

local _ENV = nil
-- luacheck: std none

local M = {}

function M.setup(module, events, host_events)
	local host = module.host
	local modulemanager = require "core.modulemanager"

	local deciding = setmetatable({}, { __mode = "k" }) -- stanza -> true while its event runs
	local waiting = setmetatable({}, { __mode = "k" })  -- stanza -> how to push it once stored

	local function wrapper(handlers, name, data)
		local stanza = data.stanza
		if not stanza or deciding[stanza] then return handlers(name, data) end
		waiting[stanza] = { name = name, origin = data.origin, username = data.username, marks = stanza._push_notify }
		deciding[stanza] = true
		local ret = handlers(name, data)
		deciding[stanza] = nil
		return ret
	end

	local function veto(event)
		local stanza = event.original_stanza
		if stanza and deciding[stanza] then
			event.reason = "pushed by mod_offline once the message is stored"
			return true
		end
	end

	-- A handler of offline-store/store may store another stanza than the one offered.
	local function before_store(event) event.offline_push = waiting[event.stanza] end
	local function after_store(event)
		local w = event.offline_push
		if w and event.stanza ~= nil and not waiting[event.stanza] then waiting[event.stanza] = w end
	end

	local function stored(event)
		local stanza = event.stanza
		local w = waiting[stanza]
		if not w then return end
		waiting[stanza], deciding[stanza] = nil, nil
		local cn = modulemanager.get_module(host, "cloud_notify")
		local handlers = cn and cn.module.event_handlers:get(host_events, w.name)
		if not handlers then return end
		stanza._push_notify = w.marks -- (marked by the vetoed attempt: not a push)
		for handler in pairs(handlers) do
			handler({ stanza = stanza, origin = w.origin, username = w.username or event.username })
		end
	end

	-- Rows leased to a session that ends unacknowledged go back to the queue: one push,
	-- unless mod_cloud_notify pushed for this session while it hibernated.
	local function unbind(event)
		local session = event.session
		local s = session and session.offline_drain
		if s and s.leased and s.inflight[1] and not session.first_hibernated_push then
			module:fire_event("cloud-notify-ping", { user = session.username })
		end
	end

	local hooks = {
		{ "cloud_notify/push", veto, 1000 },
		{ events.STORE, before_store, 1000 },
		{ events.STORE, after_store, -1000 },
		{ events.STORED, stored, 0 },
		{ "resource-unbind", unbind, 1 }, -- (before mod_offline's releases the lease)
	}
	-- (util.events makes a closure for each wrapper at each firing of its event)
	local wrapped = { "message/offline/handle", "message/bare/groupchat" }
	local attached = false
	local function attach(on)
		if on == attached then return end
		attached = on
		for _, name in ipairs(wrapped) do
			if on then module:wrap_event(name, wrapper) else module:unhook_object_event(host_events.wrappers, name, wrapper) end
		end
		for _, h in ipairs(hooks) do
			if on then module:hook(h[1], h[2], h[3]) else module:unhook(h[1], h[2]) end
		end
	end
	attach(modulemanager.is_loaded(host, "cloud_notify"))
	module:hook("module-loaded", function(event)
		if event.module == "cloud_notify" then attach(true) end
	end)
	module:hook("module-unloaded", function(event)
		if event.module == "cloud_notify" then attach(false) end
	end)
end

return M
