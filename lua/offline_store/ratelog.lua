-- offline_store.ratelog: log lines an operator must see (rejections, failures)
-- without letting a flood of them fill the log: at most one line per kind every
-- `interval` seconds; the next line that gets through says how many were left out.

local setmetatable, select, unpack = setmetatable, select, table.unpack

local _ENV = nil
-- luacheck: std none

local M = {}
local methods = {}
methods.__index = methods

-- log(level, fmt, ...) is the logger (module:log without the module); now() gives
-- seconds.
function M.new(log, interval, now)
	return setmetatable({ log = log, interval = interval, now = now, next_at = {}, suppressed = {} }, methods)
end

-- Logs one line of `kind` unless one went out less than `interval` seconds ago.
-- Returns true when the line was written.
function methods:line(kind, level, fmt, ...)
	local t = self.now()
	local next_at = self.next_at[kind]
	if next_at and t < next_at then
		self.suppressed[kind] = (self.suppressed[kind] or 0) + 1
		return false
	end
	self.next_at[kind] = t + self.interval
	local n = self.suppressed[kind]
	self.suppressed[kind] = nil
	if n then
		local args = { n = select("#", ...) + 1, ... }
		args[args.n] = n
		self.log(level, fmt .. " (%d more like it not logged since the last one)", unpack(args, 1, args.n))
	else
		self.log(level, fmt, ...)
	end
	return true
end

return M
