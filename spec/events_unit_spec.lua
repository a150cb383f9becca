-- offline_store.events and offline_store.push without a server, on Prosody's util.events:
-- an event nobody hooks is not fired and builds no table; hooked, its payloads, vetoes and
-- rewrites, and the stores of a batch told at its commit; push's wrappers and hooks in place
-- only while mod_cloud_notify is loaded.

local lu = require "luaunit"
local util_events = require "util.events"
local st = require "util.stanza"
local events = require "offline_store.events"
local push = require "offline_store.push"

-- util.events with each firing counted.
local function counted()
	local he = util_events.new()
	local fired = {}
	local fire = he.fire_event
	he.fire_event = function(name, data)
		fired[#fired + 1] = name
		return fire(name, data)
	end
	return he, fired
end

local function msg(id) return st.message({ to = "bob@example.org", from = "a@example.org/r", id = id }) end

TestEvents = {}

function TestEvents:test_unhooked_events_are_not_fired()
	local he, fired = counted()
	local ev = events.new(he)
	local m = msg("1")
	lu.assertIs(ev:store(m, "bob"), m)
	ev:stored(m, "bob", 1, 1)
	ev:rejected(m, "bob", "limit")
	ev:delivered({ username = "bob" }, 1)
	ev:acked({ username = "bob" }, 1)
	ev:pending(m, "bob", 1, 1)
	lu.assertEquals(ev.n, 0, "nothing queued for a commit nobody hears of")
	ev:commit()
	ev:lost()
	lu.assertEquals(fired, {})
	lu.assertFalse(ev:hooked(events.STORE))
end

function TestEvents:test_hooked_events_veto_rewrite_and_tell()
	for _, fallback in ipairs({ false, true }) do
		local he, fired = counted()
		if fallback then he._event_map = nil end -- (an events object without the map: asked through get_handlers)
		local ev = events.new(he)
		local seen = {}
		local function veto(e) if e.stanza.attr.id == "spam" then e.reason = "spam"; return true end end
		he.add_handler(events.STORE, veto)
		local function rewrite(e) if e.stanza.attr.id == "old" then e.stanza = msg("new") end end
		he.add_handler(events.STORE, rewrite, -1)
		he.add_handler(events.REJECTED, function(e) seen[#seen + 1] = { "rejected", e.username, e.reason, e.detail } end)
		lu.assertTrue(ev:hooked(events.STORE))
		lu.assertEquals({ ev:store(msg("spam"), "bob") }, { nil, "spam" })
		lu.assertEquals(ev:store(msg("old"), "bob").attr.id, "new")
		ev:rejected(msg("x"), "bob", "policy", "vetoed")
		lu.assertEquals(seen, { { "rejected", "bob", "policy", "vetoed" } })
		-- a batch: stores are pending until it commits, or told as failures when it is lost
		he.add_handler(events.STORED, function(e) seen[#seen + 1] = { "stored", e.username, e.id, e.count, e.stanza.attr.id } end)
		ev:pending(msg("a"), "bob", 7, 1)
		ev:pending(msg("b"), "carol", 8, 2)
		lu.assertEquals(#seen, 1, "not before the commit")
		ev:commit()
		lu.assertEquals(seen[2], { "stored", "bob", 7, 1, "a" })
		lu.assertEquals(seen[3], { "stored", "carol", 8, 2, "b" })
		ev:pending(msg("c"), "bob", 9, 3)
		ev:lost()
		lu.assertEquals(seen[4], { "rejected", "bob", "failure" })
		-- unhooked again: not fired again
		he.remove_handler(events.STORE, veto)
		lu.assertNotNil(ev:store(msg("spam"), "bob"), "the veto is gone")
		he.remove_handler(events.STORE, rewrite)
		lu.assertFalse(ev:hooked(events.STORE))
		local n = #fired
		lu.assertEquals(ev:store(msg("old"), "bob").attr.id, "old")
		lu.assertEquals(#fired, n, "its last handler gone: not fired")
	end
end

function TestEvents:test_session_events()
	local he = util_events.new()
	local ev = events.new(he)
	local got = {}
	he.add_handler(events.DELIVERED, function(e) got[#got + 1] = { "delivered", e.username, e.count } end)
	he.add_handler(events.ACKED, function(e) got[#got + 1] = { "acked", e.username, e.count } end)
	ev:delivered({ username = "bob" }, 3)
	ev:acked({ username = "bob" }, 2)
	lu.assertEquals(got, { { "delivered", "bob", 3 }, { "acked", "bob", 2 } })
end

-- mod_offline's module over a real util.events, and core.modulemanager saying whether
-- mod_cloud_notify is loaded.
local function fake_module(he)
	local module = { host = "example.org", wrapped = {} }
	function module:wrap_event(name, fn) self.wrapped[name] = (self.wrapped[name] or 0) + 1; he.add_wrapper(name, fn) end
	function module:unhook_object_event(object, name, fn)
		assert(object == he.wrappers)
		self.wrapped[name] = self.wrapped[name] - 1
		he.remove_wrapper(name, fn)
	end
	function module:hook(name, fn, prio) he.add_handler(name, fn, prio) end
	function module:unhook(name, fn) he.remove_handler(name, fn) end
	function module:fire_event(name, data) return he.fire_event(name, data) end
	return module
end

TestPush = {}

function TestPush:setUp()
	self.saved = package.loaded["core.modulemanager"]
	self.loaded = false
	local spec = self
	package.loaded["core.modulemanager"] = {
		is_loaded = function(_, name) return name == "cloud_notify" and spec.loaded end,
		get_module = function() return nil end,
	}
end

function TestPush:tearDown()
	package.loaded["core.modulemanager"] = self.saved
end

function TestPush:test_in_place_only_while_cloud_notify_is_loaded()
	local he = util_events.new()
	local module = fake_module(he)
	push.setup(module, events, he)
	lu.assertEquals(module.wrapped, {}, "no wrapper: nothing per offline message")
	lu.assertNil(he._event_map["cloud_notify/push"])
	lu.assertNil(he._event_map[events.STORE], "offline-store/store stays unhooked: no table per message")

	-- mod_cloud_notify loaded: its push from message/offline/handle waits for the store
	self.loaded = true
	he.fire_event("module-loaded", { module = "cloud_notify" })
	lu.assertEquals(module.wrapped, { ["message/offline/handle"] = 1, ["message/bare/groupchat"] = 1 })
	lu.assertNotNil(he._event_map[events.STORE])
	local vetoed
	he.add_handler("message/offline/handle", function(e)
		local push_event = { original_stanza = e.stanza }
		vetoed = he.fire_event("cloud_notify/push", push_event) and push_event.reason
	end, 1)
	he.fire_event("message/offline/handle", { stanza = msg("p"), username = "bob" })
	lu.assertStrContains(vetoed, "once the message is stored")
	he.fire_event("module-loaded", { module = "cloud_notify" })
	lu.assertEquals(module.wrapped["message/offline/handle"], 1, "wrapped once")

	-- unloaded: all of it goes
	self.loaded = false
	he.fire_event("module-unloaded", { module = "cloud_notify" })
	lu.assertEquals(module.wrapped, { ["message/offline/handle"] = 0, ["message/bare/groupchat"] = 0 })
	lu.assertNil(he._event_map["cloud_notify/push"])
	lu.assertNil(he._event_map[events.STORE])
	vetoed = "not fired"
	he.fire_event("message/offline/handle", { stanza = msg("q"), username = "bob" })
	lu.assertNil(vetoed, "no veto")
end
