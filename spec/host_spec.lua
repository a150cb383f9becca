-- The plugin's work on one host without a server (offline_store.host), with its metrics
-- (offline_store.metrics) and the process-wide group commit (offline_store.group): what
-- is stored, committed, counted, told to a sender, set aside, adopted, swept; the store
-- reopened on use; the limit remembered until the rules change.

local lu = require "luaunit"
local support = require "support.util"
local core = require "offline_store.core"
local st = require "util.stanza"
local host_mod = require "offline_store.host"
local metrics = require "offline_store.metrics"
local group = require "offline_store.group"

local H = "example.org"

-- module:metric stand-in that keeps what is counted and sampled, by metric and label.
local function recording_metric()
	local seen = {}
	local function metric(kind, name, _, _, labels, extra)
		local family = { kind = kind, labels = labels, extra = extra, by = {} }
		function family:with_labels(label)
			local key = label or ""
			local m = self.by[key]
			if not m then
				m = { count = 0, samples = 0 }
				function m:add(n) self.count = self.count + n end
				function m:sample() self.samples = self.samples + 1 end
				self.by[key] = m
			end
			return m
		end
		seen[name] = family
		return family
	end
	return metric, seen
end

local function count(seen, name, label) local m = seen[name].by[label or ""]; return m and m.count or 0 end

local function chat(to, id, from)
	return st.message({ to = to, from = from or "alice@example.org/a", type = "chat", id = id }):tag("body"):text("hi " .. id):up()
end

TestMetrics = {}

function TestMetrics:test_families_and_fresh_buckets()
	local metric, seen = recording_metric()
	local m = metrics.new(metric)
	lu.assertTrue(m.timed, "a real histogram has a sample function")
	lu.assertEquals(seen.write_messages.kind, "histogram")
	lu.assertEquals(seen.failed.labels, { "operation" })
	lu.assertEquals(seen.dropped_by_policy.labels, { "reason" })
	lu.assertNotIs(seen.write_messages.extra.buckets, seen.pop_messages.extra.buckets, "Prosody appends to the table it gets")
	lu.assertEquals(seen.write_messages.extra.buckets, seen.pop_messages.extra.buckets)
end

function TestMetrics:test_stand_in_is_not_timed()
	-- with statistics off, every field of Prosody's stand-in is the stand-in itself
	local stand_in = setmetatable({}, { __index = function(t) return t end, __call = function(t) return t end })
	local m = metrics.new(function() return stand_in end)
	lu.assertFalse(m.timed)
end

TestHost = {}

function TestHost:setUp()
	self.dir = support.tmpdir()
	self.metric, self.seen = recording_metric()
	self.sent, self.timers, self.lines, self.t = {}, {}, {}, 1700000000
	self.limit_asked = 0
	self.group, self.stores = {}, {}
	group.install(self.group, { add_filter = function() end, add_filter_hook = function() end },
		{ full_sessions = {}, incoming_s2s = {}, hosts = {} })
	self.opens = 0
	self.settings = { store = { backend = "sqlite", file = self.dir .. "/o.sqlite" }, node = "n1", lease = 300, groupchat = false }
	local spec = self
	self.h = host_mod.new {
		host = H, settings = self.settings, core = core, metrics = metrics.new(self.metric),
		group = self.group, stores = self.stores,
		limit = function(bare) spec.limit_asked = spec.limit_asked + 1; return bare == "full@" .. H and 1 or nil end,
		open = function(s)
			spec.opens = spec.opens + 1
			if spec.refuse_open then return nil, "database away" end
			return core.open_sqlite(s.store.file)
		end,
		log = function(level, fmt, ...) spec.lines[#spec.lines + 1] = level .. " " .. fmt:format(...) end,
		send = function(stanza) spec.sent[#spec.sent + 1] = stanza end,
		later = function(secs, fn) spec.timers[#spec.timers + 1] = { secs, fn } end,
		now = function() return spec.t end,
		notice = require "offline_store.ratelog".new(function(level, fmt, ...)
			spec.lines[#spec.lines + 1] = level .. " " .. fmt:format(...) end, 60, function() return spec.t end),
	}
end

function TestHost:tearDown()
	self.h:unload()
	support.rmrf(self.dir)
end

function TestHost:loaded()
	self.h:load(assert(self.h.open(self.settings)))
	return self.h
end

function TestHost:logged(pattern)
	for _, line in ipairs(self.lines) do if line:match(pattern) then return line end end
end

function TestHost:test_stores_join_a_batch_counted_at_commit()
	local h = self:loaded()
	lu.assertIs(self.stores[H], h.guarded)
	for i = 1, 3 do lu.assertTrue(h:offer(nil, chat("bob@" .. H, "m" .. i), "bob")) end
	lu.assertTrue(self.group.open[h.b], "an open batch is known process-wide")
	lu.assertEquals(count(self.seen, "stored"), 0, "counted when committed")
	self.group.filter(st.message()) -- anything leaving the server commits it first
	lu.assertNil(self.group.open[h.b])
	lu.assertEquals(count(self.seen, "stored"), 3)
	lu.assertEquals(self.seen.write_messages.by[""].samples, 3)
	local n = h.db:count(H, "bob")
	lu.assertEquals(n, 3)
	lu.assertEquals(#self.sent, 0)
end

function TestHost:test_full_queue_tells_the_sender_and_the_log()
	local h = self:loaded()
	lu.assertTrue(h:offer(nil, chat("full@" .. H, "a"), "full"))
	lu.assertTrue(h:offer(nil, chat("full@" .. H, "b"), "full"))
	lu.assertEquals(#self.sent, 1)
	lu.assertEquals(self.sent[1].attr.type, "error")
	lu.assertEquals(self.sent[1].attr.id, "b")
	lu.assertEquals(count(self.seen, "rejected_by_limit"), 1)
	lu.assertNotNil(self:logged("^warn Offline queue of full@example.org is full %(1 messages%)"))
	lu.assertEquals(self.limit_asked, 1, "the limit is remembered")
	h:set_limit(function() self.limit_asked = self.limit_asked + 1 end)
	lu.assertTrue(h:offer(nil, chat("full@" .. H, "c"), "full"))
	lu.assertEquals(self.limit_asked, 2, "new rules: asked again")
	lu.assertEquals(#self.sent, 1, "no limit now: stored")
end

-- offline_over_limit and the byte rule: each outcome with its counter. full@ has a count
-- limit of 1 (setUp); the byte rule here gives everyone 250 bytes but admin@, who has none.
function TestHost:test_over_limit_policies_and_byte_limit()
	local h = self:loaded()
	local asked = 0
	h:set_limit(h.limit, function(bare) asked = asked + 1; if bare ~= "admin@" .. H then return 250 end end)
	local big = chat("bob@" .. H, "big"):tag("x", { xmlns = "urn:example:pad" }):text(("p"):rep(300)):up()
	lu.assertTrue(h:offer(nil, big, "bob"))
	lu.assertEquals({ #self.sent, self.sent[1] and self.sent[1].attr.type }, { 1, "error" }, "bounce: over the byte limit")
	lu.assertTrue(h:offer(nil, st.clone(big), "admin"))
	lu.assertEquals(#self.sent, 1, "admin: no byte limit")
	lu.assertTrue(h:offer(nil, chat("bob@" .. H, "b2"), "bob"))
	lu.assertTrue(h:offer(nil, chat("bob@" .. H, "b3"), "bob"))
	lu.assertEquals(asked, 2, "the byte limit is remembered per recipient")
	self.settings.over_limit = "drop"
	lu.assertTrue(h:offer(nil, chat("full@" .. H, "f1"), "full"))
	lu.assertTrue(h:offer(nil, chat("full@" .. H, "f2"), "full"))
	lu.assertTrue(h:offer(nil, st.clone(big), "bob"))
	lu.assertEquals(#self.sent, 1, "drop: the sender is told nothing")
	lu.assertEquals(count(self.seen, "dropped_by_policy", "over_limit"), 2, "the full queue and the message over the quota")
	lu.assertEquals(count(self.seen, "rejected_by_limit"), 1)
	self.settings.over_limit = "drop_oldest"
	lu.assertTrue(h:offer(nil, chat("full@" .. H, "f3"), "full"))
	lu.assertTrue(h:offer(nil, chat("full@" .. H, "f4"), "full"))
	lu.assertEquals(#self.sent, 1)
	lu.assertEquals(count(self.seen, "evicted_by_limit"), 2)
	h:flush()
	local items = h.db:list(H, "full")
	lu.assertEquals(#items, 1)
	lu.assertStrContains(items[1].xml, "id='f4'", "the newest stays")
	lu.assertTrue(h:offer(nil, st.clone(big), "bob"))
	lu.assertEquals({ #self.sent, self.sent[2] and self.sent[2].attr.id }, { 2, "big" },
		"drop_oldest: a message over the whole quota is refused with the error")
	lu.assertEquals(count(self.seen, "rejected_by_limit"), 2)
	h:flush()
	lu.assertEquals(h.db:count(H, "bob"), 2, "and nothing was evicted for it")
end

function TestHost:test_duplicate_and_dropped_messages_are_counted()
	local h = self:loaded()
	local m = chat("bob@" .. H, "d"):tag("origin-id", { xmlns = "urn:xmpp:sid:0", id = "o1" }):up()
	lu.assertTrue(h:offer(nil, m, "bob"))
	h:flush()
	lu.assertTrue(h:offer(nil, st.clone(m), "bob"))
	lu.assertEquals(count(self.seen, "dropped_by_policy", "duplicate"), 1)
	lu.assertTrue(h:offer(nil, st.message({ to = "bob@" .. H, type = "error" }), "bob"))
	lu.assertEquals(count(self.seen, "dropped_by_policy", "error"), 1)
	h:flush()
	lu.assertEquals(h.db:count(H, "bob"), 1)
end

function TestHost:test_requeue_from_the_recipient_is_committed_at_once()
	local h = self:loaded()
	local origin = { username = "bob", host = H }
	lu.assertTrue(h:from_recipient(origin, "bob"))
	lu.assertFalse(h:from_recipient({ username = "eve", host = H }, "bob"))
	lu.assertTrue(h:offer(origin, chat("bob@" .. H, "r"), "bob"))
	lu.assertNil(self.group.open[h.b], "no batch left open")
	lu.assertEquals(count(self.seen, "stored"), 1)
end

-- message/bare/groupchat: online, to the sessions (or, groupchat off, left to Prosody's
-- bounce); offline, or no session took it, offered for storage (when groupchat is on).
function TestHost:test_groupchat_goes_to_the_sessions_or_is_offered()
	local h = self:loaded()
	local function groupchat(id)
		return { stanza = st.message({ to = "bob@" .. H, from = "room@muc." .. H .. "/a", type = "groupchat", id = id })
			:tag("body"):text("hi"):up() }
	end
	local got = {}
	local session = { send = function(stanza) got[#got + 1] = stanza.attr.id; return true end }
	local online = { top_resources = { session } }
	lu.assertNil(h:groupchat(groupchat("g1"), online), "groupchat off: the usual bounce")
	lu.assertEquals(got, {})
	self.settings.groupchat = true
	lu.assertTrue(h:groupchat(groupchat("g2"), online))
	lu.assertEquals(got, { "g2" }, "sent to the online session")
	session.send = function() return false end
	lu.assertTrue(h:groupchat(groupchat("g3"), online))
	lu.assertTrue(h:groupchat(groupchat("g4"), nil))
	lu.assertTrue(h:groupchat(groupchat("g5"), { top_resources = {} }))
	h:flush()
	lu.assertEquals(h.db:count(H, "bob"), 3, "no session took it, or none online: stored")
	self.settings.groupchat = false
	lu.assertTrue(h:groupchat(groupchat("g6"), nil))
	lu.assertEquals(count(self.seen, "dropped_by_policy", "groupchat"), 1, "offline, groupchat off: not stored")
	h:flush()
	lu.assertEquals(h.db:count(H, "bob"), 3)
end

-- What offline_store.flexible gets: the drainer's store and delivery, the user's sessions,
-- the option as it is now.
function TestHost:test_flexible_cfg()
	local h = self:loaded()
	local drainer = { db = function() end, later = function() end, log = function() end, deliver = function() end }
	local sessions = { a = {} }
	local cfg = h:flexible_cfg(drainer, { ["bob@" .. H] = { sessions = sessions } })
	lu.assertEquals(cfg.host, H)
	lu.assertIs(cfg.db, drainer.db)
	lu.assertIs(cfg.deliver, drainer.deliver)
	lu.assertEquals(cfg.set_aside_meta, core.SET_ASIDE)
	lu.assertIs(cfg.sessions("bob"), sessions)
	lu.assertNil(cfg.sessions("carol"))
	lu.assertFalse(not not cfg.on())
	h.settings = { flexible = true }
	lu.assertTrue(cfg.on(), "asked again: a config reload")
	lu.assertTrue(cfg.from_recipient({ username = "bob", host = H }, "bob"))
	lu.assertEquals(cfg.recipient({ stanza = st.message({ to = "carol@" .. H }) }), "carol")
	lu.assertEquals(cfg.now_us(), self.t * 1000000)
end

function TestHost:test_store_away_at_load_reopens_on_use_at_most_every_few_seconds()
	self.refuse_open = true
	local h = self.h
	h:load(nil, "database away")
	lu.assertNotNil(self:logged("^error database away; until it opens"))
	lu.assertTrue(h:offer(nil, chat("bob@" .. H, "x"), "bob"))
	lu.assertEquals(self.opens, 0, "not before REOPEN_EVERY")
	lu.assertEquals(self.sent[1].attr.type, "error", "the sender hears of the failure")
	lu.assertEquals(count(self.seen, "failed", "write"), 1)
	self.t = self.t + host_mod.REOPEN_EVERY
	h:offer(nil, chat("bob@" .. H, "y"), "bob")
	lu.assertEquals(self.opens, 1)
	self.refuse_open = false
	h:offer(nil, chat("bob@" .. H, "z"), "bob")
	lu.assertEquals(self.opens, 1, "tried at most every REOPEN_EVERY seconds")
	self.t = self.t + host_mod.REOPEN_EVERY
	lu.assertTrue(h:offer(nil, chat("bob@" .. H, "w"), "bob"))
	lu.assertEquals(self.opens, 2)
	lu.assertNotNil(self:logged("^info Offline store open after all"))
	h:flush()
	lu.assertEquals(h.db:count(H, "bob"), 1)
end

function TestHost:test_set_aside_and_old_quarantine_adopted()
	local h = self:loaded()
	local item = { id = 7, from = "a@" .. H, xml = "<broken", ts = 1, expire = nil }
	lu.assertTrue(h:set_aside("bob", item, "not XML"))
	lu.assertEquals(count(self.seen, "failed", "deliver"), 1)
	local rows = h.db:list(H, "bob")
	lu.assertEquals(#rows, 1)
	lu.assertEquals(rows[1].meta, core.SET_ASIDE)
	-- rows under the old HOST!unparsable name move into their user's queue, set aside
	lu.assertEquals(h.db:store(H .. "!unparsable", "carol", "x@" .. H, "<old", 5), 1)
	lu.assertEquals(#self.timers, 1, "adopted from the loop, not at load")
	self.timers[1][2]()
	lu.assertEquals(h.db:count(H .. "!unparsable", "carol"), 0)
	rows = h.db:list(H, "carol")
	lu.assertEquals(#rows, 1)
	lu.assertEquals(rows[1].meta, core.SET_ASIDE)
	lu.assertNotNil(self:logged("^info Moved 1 undeliverable offline messages of carol@example.org"))
end

function TestHost:test_sweep_and_account_removal()
	local h = self:loaded()
	local now = h:now_us()
	h.db:store(H, "gone", "a@" .. H, "<m/>", now)
	h.db:store(H, "bob", "a@" .. H, "<m/>", now, now - 1)
	h.db:store(H, "bob", "a@" .. H, "<m/>", now)
	h:sweep(function(user) return user ~= "gone" end)
	lu.assertNotNil(self:logged("^info Expiry sweep: Removed 1 messages"))
	lu.assertNotNil(self:logged("^info Orphaned queues: Removed 1 messages from 1 deleted accounts"))
	lu.assertEquals(h.db:count(H, "bob"), 1)
	h:remove_user("bob")
	lu.assertEquals(h.db:count(H, "bob"), 0)
	lu.assertNotNil(self:logged("^debug Removed 1 offline messages of deleted user bob@example.org"))
end

function TestHost:test_leases_released_at_start_and_renewed()
	local h = self:loaded()
	local now = h:now_us()
	h.db:store(H, "bob", "a@" .. H, "<m/>", now)
	local items = h.db:lease(H, "bob", h:owner_prefix() .. "s1", now, now + 1000000000, 10)
	lu.assertEquals(#items, 1)
	lu.assertEquals(h:renew(), 100, "the next renewal in a third of the lease")
	h:release_at_start({}, nil)
	lu.assertNotNil(self:logged("^info Released 1 offline messages leased before the restart"))
	lu.assertEquals(#h.db:lease(H, "bob", "other", now, now + 1000000, 10), 1, "queued again")
	-- a module reload: live sessions' drains are scheduled again, nothing released
	local scheduled = {}
	local session = { host = H, offline_drain = { scheduled = true } }
	h:release_at_start({ session }, { schedule = function(_, s) scheduled[#scheduled + 1] = s end })
	lu.assertEquals(scheduled, { session })
	lu.assertFalse(session.offline_drain.scheduled)
end

function TestHost:test_memory_store_handed_over_across_a_reload()
	self.settings.store = { backend = "memory" }
	local h = self.h
	h:load(core.open_memory())
	h.db:store(H, "bob", "a@" .. H, "<m/>", 1)
	local data = h:save()
	h:unload()
	lu.assertNil(self.stores[H])
	lu.assertEquals(data.db:count(H, "bob"), 1, "not closed: handed over")
	local h2 = host_mod.new { host = H, settings = self.settings, core = core, metrics = h.metrics, group = self.group,
		stores = self.stores, later = h.later, log = h.log, now = h.now }
	h2:restore(data)
	lu.assertEquals(h2.db:count(H, "bob"), 1)
	lu.assertIs(self.stores[H], h2.guarded)
	h2:unload()
end

TestGroup = {}

function TestGroup:test_filter_on_every_session_once_and_before_write_commits_the_others()
	local added, hooks = {}, {}
	local filters = {
		add_filter = function(session, kind, f, prio) added[#added + 1] = { session, kind, f, prio } end,
		add_filter_hook = function(f) hooks[#hooks + 1] = f end,
	}
	local c2s, s2sin, s2sout = {}, {}, {}
	local g = {}
	group.install(g, filters, { full_sessions = { a = c2s }, incoming_s2s = { [s2sin] = true },
		hosts = { [H] = { s2sout = { x = s2sout } } } })
	lu.assertEquals(#added, 3)
	lu.assertEquals(#hooks, 1)
	lu.assertEquals(added[1][2], "stanzas/out")
	group.install(g, filters, { full_sessions = {}, incoming_s2s = {}, hosts = {} })
	lu.assertEquals(#hooks, 1, "installed once per process")

	local dir = support.tmpdir()
	local db1, db2 = assert(core.open_sqlite(dir .. "/g.sqlite")), assert(core.open_sqlite(dir .. "/g.sqlite"))
	local later = {}
	local b1 = group.batch(g, db1, { max = 10, later = function(fn) later[#later + 1] = fn end })
	local b2 = group.batch(g, db2, { max = 10, later = function(fn) later[#later + 1] = fn end })
	lu.assertEquals(b1:store("t", H, "bob", "f", "<m/>", 1), 1)
	lu.assertTrue(g.open[b1])
	lu.assertEquals(#later, 1, "flushed at the latest on the next loop turn")
	-- the other host's batch on the same file commits before this one writes
	lu.assertEquals(b2:store("t", H, "bob", "f", "<m/>", 1), 2)
	lu.assertNil(g.open[b1])
	lu.assertTrue(g.open[b2])
	later[2]()
	lu.assertNil(g.open[b2])
	db1:close(); db2:close()
	support.rmrf(dir)
end
