-- offline_store.drain on the memory store, with sessions whose XEP-0198 queue is Prosody's own
-- util.smqueue (what mod_smacks keeps in session.outgoing_stanza_queue): pages, leases, acks,
-- release at the end of a session, a second session held back, the classic paged pop.

local lu = require "luaunit"
local core = require "offline_store.core"
local drain = require "offline_store.drain"
local policy = require "offline_store.policy"
local smqueue = require "util.smqueue"
local st = require "util.stanza"

local HOST, USER = "localhost", "bob"

local function session(id, smacks)
	local s = { id = id, username = USER, host = HOST, full_jid = USER .. "@" .. HOST .. "/" .. id, sent = {} }
	if smacks then
		s.smacks, s.outgoing_stanza_queue = "urn:xmpp:sm:3", smqueue.new(500)
	end
	function s.send(stanza)
		s.sent[#s.sent + 1] = stanza
		local q = s.outgoing_stanza_queue
		if q and not s.drop_next and stanza.attr.xmlns == nil then q:push(st.clone(stanza)) end
		return true
	end
	return s
end

local function ids(list)
	local out = {}
	for i, m in ipairs(list) do out[i] = m.attr.id end
	return out
end

local function range(a, b)
	local out = {}
	for i = a, b do out[#out + 1] = "m" .. i end
	return out
end

TestDrain = {}

function TestDrain:setUp()
	self.db = assert(core.open_memory())
	self.timers, self.acks, self.aside, self.aside_fails = {}, {}, {}, nil
	self.clock = 1000 * 1000000
	self.d = drain.new {
		host = HOST, page = 10, lease = 300, owner_prefix = "node " .. HOST .. " ",
		delay_text = policy.DELAY_TEXT,
		now_us = function() return self.clock end,
		db = function() return self.db end,
		deliver = function(item) return policy.delivery(item, HOST) end,
		set_aside = function(_, item, why)
			if self.aside_fails then return false end
			self.aside[#self.aside + 1] = { item.id, why }
			return true
		end,
		later = function(secs, fn) self.timers[#self.timers + 1] = { secs, fn } end,
		request_ack = function(s) self.acks[#self.acks + 1] = s.id end,
		log = function() end, delivered = function() end, failed = function() end,
	}
end

function TestDrain:tearDown() self.db:close() end

function TestDrain:fill(n, first)
	for i = first or 1, (first or 1) + n - 1 do
		assert(self.db:store(HOST, USER, "alice@localhost/r",
			("<message from='alice@localhost/r' to='bob@localhost' id='m%d'><body>%d</body></message>"):format(i, i),
			i * 1000000))
	end
end

-- Runs the zero-delay timers (and, with `all`, the delayed ones) until none is left.
function TestDrain:run(all)
	local guard = 0
	while true do
		local t
		for i, timer in ipairs(self.timers) do
			if timer[1] == 0 or all then t = table.remove(self.timers, i); break end
		end
		if not t then return end
		t[2]()
		guard = guard + 1
		assert(guard < 10000)
	end
end

local function ack(s, h)
	assert(s.outgoing_stanza_queue:ack(h))
end

function TestDrain:count() return (self.db:count(HOST, USER)) end

function TestDrain:test_a_page_at_a_time_deleted_when_acked()
	self:fill(25)
	local s = session("phone", true)
	self.d:start(s)
	lu.assertEquals(#s.sent, 0, "from a timer, not inside the broadcast")
	self:run()
	lu.assertEquals(ids(s.sent), range(1, 10))
	lu.assertEquals(self.acks, { "phone" }, "an ack requested after the page")
	lu.assertEquals(self:count(), 25, "leased, not deleted")
	ack(s, 6); self.d:acked(s); self:run()
	lu.assertEquals(self:count(), 19, "deleted as acked")
	lu.assertEquals(#s.sent, 10, "no page before the whole page is acked")
	ack(s, 10); self.d:acked(s); self:run()
	lu.assertEquals(ids(s.sent), range(1, 20))
	ack(s, 20); self.d:acked(s); self:run()
	ack(s, 25); self.d:acked(s); self:run()
	lu.assertEquals(ids(s.sent), range(1, 25))
	lu.assertEquals(self:count(), 0)
end

function TestDrain:test_session_end_releases_and_copies_are_recognised()
	self:fill(15)
	local s = session("phone", true)
	self.d:start(s); self:run()
	ack(s, 4); self.d:acked(s)
	-- mod_smacks gives back clones of the unacked stanzas: all ours
	local n = 0
	for _, clone in ipairs(s.outgoing_stanza_queue:table()) do
		if self.d:failure(s, clone) then n = n + 1 end
	end
	lu.assertEquals(n, 6)
	local other = policy.delivery({ xml = "<message from='alice@localhost/r' id='m5'/>", ts = 99 * 1000000 }, HOST)
	lu.assertNil(self.d:failure(s, other), "another stanza (other stamp) is not ours")
	self.d:unbind(s)
	local again = session("laptop", false)
	self.d:start(again); self:run()
	lu.assertEquals(ids(again.sent), range(5, 14), "the released rows, in order, then the rest")
	self.d:ondrain(again); self:run()
	lu.assertEquals(ids(again.sent), range(5, 15))
	lu.assertEquals(self:count(), 0, "delivered = written without XEP-0198")
end

function TestDrain:test_second_session_waits_for_the_lease()
	self:fill(12)
	local phone, laptop = session("phone", true), session("laptop", true)
	self.d:start(phone); self:run()
	self.d:start(laptop); self:run()
	lu.assertEquals(#laptop.sent, 0, "nothing behind a live lease")
	ack(phone, 3); self.d:acked(phone)
	self.d:unbind(phone); self:run()
	lu.assertEquals(ids(laptop.sent), range(4, 12), "the other session takes over at once")
end

function TestDrain:test_lease_expiry_lets_a_waiting_session_in()
	self:fill(3)
	local phone, laptop = session("phone", true), session("laptop", false)
	self.d:start(phone); self:run()
	self.d:start(laptop); self:run()
	lu.assertEquals(#laptop.sent, 0)
	self.clock = self.clock + 301 * 1000000 -- (a node that died: its lease ran out)
	self:run(true)
	lu.assertEquals(ids(laptop.sent), range(1, 3))
end

function TestDrain:test_resumption_acks_and_goes_on()
	self:fill(12)
	local s = session("phone", true)
	self.d:start(s); self:run()
	s.hibernating = os.time()
	ack(s, 10) -- the <resume/>'s h
	s.hibernating = nil
	self.d:resumed(s); self:run()
	lu.assertEquals(ids(s.sent), range(1, 12))
	lu.assertEquals(self:count(), 2)
end

function TestDrain:test_unqueued_stanza_counts_as_written_and_bad_rows_are_set_aside()
	assert(self.db:store(HOST, USER, "x", "<message id='cut'><body>", 1))
	self:fill(2)
	local s = session("phone", true)
	s.drop_next = true -- (a filter drops what is sent before mod_smacks queues it)
	self.d:start(s); self:run()
	lu.assertEquals(ids(s.sent), { "m1", "m2" })
	lu.assertEquals(#self.aside, 1)
	lu.assertEquals(self:count(), 0, "nothing left leased: the bad row and the unqueued ones are done")
end

-- A bad row whose setting aside fails stays leased (released when the session ends), and a
-- send that raises confirms nothing: neither is lost.
-- A session that dies inside a send gives its queue back from inside that send (the stanza
-- being sent included); each copy is recognised once, as many times as the row was sent.
function TestDrain:test_copies_given_back_inside_the_send_are_recognised_once_each()
	self:fill(3)
	local s = session("phone", true)
	local send, recognised = s.send, {}
	s.send = function(stanza)
		local ok = send(stanza)
		if stanza.attr.id == "m2" then
			for _, clone in ipairs(s.outgoing_stanza_queue:table()) do
				recognised[#recognised + 1] = self.d:failure(s, clone) or false
			end
			recognised[#recognised + 1] = self.d:failure(s, st.clone(stanza)) or false
		end
		return ok
	end
	self.d:start(s); self:run()
	lu.assertEquals(recognised, { true, true, false }, "m1 (in flight) and m2 (being sent), once each")
	lu.assertTrue(self.d:failure(s, st.clone(s.sent[3])), "m3, sent after")
	lu.assertNil(self.d:failure(s, st.clone(s.sent[3])), "m3 recognised once only")
	self.d:unbind(s)
	lu.assertNil(self.d:failure(s, st.clone(s.sent[1])), "released: nothing is in flight")
end

-- The time of each page (its read and its sending) goes to cfg.timed: a clock that moves a
-- second per stanza sent gives a page of 10 ten seconds.
function TestDrain:test_each_page_is_timed_with_its_sending()
	self:fill(25)
	local times = {}
	self.d.timed = function(us) times[#times + 1] = us // 1000000 end
	local s = session("laptop", false)
	local send = s.send
	s.send = function(stanza) self.clock = self.clock + 1000000; return send(stanza) end
	self.d:start(s); self:run()
	self.d:ondrain(s); self:run()
	self.d:ondrain(s); self:run()
	lu.assertEquals(#s.sent, 25)
	lu.assertEquals(times, { 10, 10, 5 })
end

function TestDrain:test_failed_set_aside_and_raising_send_keep_their_rows()
	assert(self.db:store(HOST, USER, "x", "<message id='cut'><body>", 1))
	self:fill(2)
	self.aside_fails = true
	local s = session("phone", true)
	local send = s.send
	s.send = function(stanza)
		if stanza.attr and stanza.attr.id == "m2" then error("connection gone") end
		return send(stanza)
	end
	self.d:start(s); self:run()
	lu.assertEquals(ids(s.sent), { "m1" })
	lu.assertEquals(self:count(), 3, "the bad row and m2 are still stored, m1 waits for its ack")
	self.d:unbind(s)
	lu.assertEquals(#self.db:lease(HOST, USER, "another", self.clock, self.clock + 1, 10), 3,
		"released at the end of the session: the bad row (to be set aside again), m1 and m2")
end

function TestDrain:test_empty_queue_costs_a_count()
	local s = session("phone", true)
	self.d:start(s)
	lu.assertEquals(#self.timers, 0)
	lu.assertNil(s.offline_drain)
end
