-- offline_store.metrics: the plugin's metrics, made through module:metric (passed in as
-- `metric`, with its arguments): the seed's histograms, timing each backend call, and
-- counters. With the global `statistics` option unset Prosody hands out a stand-in whose
-- every field is itself; `timed` is then false and the clock is not read around every
-- store and pop.

local type = type

local _ENV = nil
-- luacheck: std none

local M = {}

-- A fresh table each time: Prosody appends +Inf to the table it is given.
local function buckets() return { 0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3 } end

-- metric(type, name, unit, description, labels, extra) -> a metric family
-- (module:metric without the module). Returns { write, pop, stored, delivered, rejected,
-- evicted: metrics; dropped, failed: families by "reason" and "operation"; timed }.
-- Over a recipient's limit (offline_over_limit): bounce and a drop_oldest that cannot
-- make room count in rejected, drop in dropped ("over_limit"), the messages drop_oldest
-- removes in evicted.
function M.new(metric)
	local m = {}
	m.write = metric("histogram", "write_messages", "seconds",
		"Time of each offline store write", {}, { buckets = buckets() }):with_labels()
	m.pop = metric("histogram", "pop_messages", "seconds",
		"Time of each offline delivery: the queue's check at login, then each page read and sent", {},
		{ buckets = buckets() }):with_labels()
	m.stored = metric("counter", "stored", "", "Messages stored offline", {}):with_labels()
	m.delivered = metric("counter", "delivered", "", "Offline messages delivered", {}):with_labels()
	m.rejected = metric("counter", "rejected_by_limit", "",
		"Messages rejected because the recipient's queue was full", {}):with_labels()
	m.evicted = metric("counter", "evicted_by_limit", "",
		"Older messages removed to make room for newer ones (offline_over_limit = drop_oldest)", {}):with_labels()
	m.dropped = metric("counter", "dropped_by_policy", "",
		"Messages deliberately not stored", { "reason" })
	m.failed = metric("counter", "failed", "", "Offline store calls that failed", { "operation" })
	m.timed = type(m.write.sample) == "function"
	return m
end

return M
