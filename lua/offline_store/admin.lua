-- offline_store.admin: the operator's commands (SPEC §8), shared by the live shell
-- (`prosodyctl shell offline ...`) and `prosodyctl mod_offline ...`. Each takes an open
-- store and plain arguments and returns ok, message; `print` shows listing lines.

local datetime = require "util.datetime"
local jid_split = require "util.jid".split

local floor, tonumber, tostring, math_type = math.floor, tonumber, tostring, math.type

local M = {}

local DAY_US = 86400 * 1000000
-- the meta of a message set aside because it could not be delivered
local SET_ASIDE = require "offline_store.core".SET_ASIDE

function M.now_us()
	return floor(require "util.time".now() * 1000000)
end

-- Splits "user@host" into user, host; or nil, error.
function M.user_jid(jid)
	local user, host, resource = jid_split(jid)
	if not user or not host or resource then
		return nil, ("expected a bare JID user@host (got %s)"):format(tostring(jid))
	end
	return user, host
end

local function fail(what, err, code)
	return nil, ("%s failed: %s (code %s)"):format(what, tostring(err), tostring(code))
end

-- count user@host
function M.count(db, user, host)
	local n, bytes = db:count(host, user)
	if not n then return fail("count", bytes) end
	return true, ("%s@%s has %d offline messages (%d bytes)"):format(user, host, n, bytes)
end

-- list user@host [max]: one line per message, oldest first, without deleting.
function M.list(db, user, host, print, max)
	max = max and tonumber(max) or 50
	if math_type(max) ~= "integer" or max < 1 then
		return nil, ("max must be a whole number >= 1 (got %s)"):format(tostring(max))
	end
	local items, err, code = db:list(host, user, 0, max)
	if not items then return fail("list", err, code) end
	for _, it in ipairs(items) do
		print(("%d  %s  from %s  %d bytes%s%s"):format(it.id, datetime.datetime(it.ts // 1000000), it.from, #it.xml,
			it.expire and ("  expires " .. datetime.datetime(it.expire // 1000000)) or "",
			it.meta == SET_ASIDE and "  [undeliverable]" or ""))
	end
	local total = db:count(host, user)
	return true, ("Listed %d of %d offline messages of %s@%s"):format(#items, total or #items, user, host)
end

local function removed(n, err, code, what)
	if not n then return fail(what, err, code) end
	return true, ("Removed %d messages"):format(n)
end

-- delete user@host: the whole queue.
function M.delete(db, user, host)
	return removed(db:remove_user(host, user), nil, nil, "delete")
end

-- expire: every expired message, of every host in this store.
function M.expire(db, now)
	local n, err, code = db:delete_expired(now or M.now_us())
	return removed(n, err, code, "expire")
end

-- Parses a number of days >= 1; or nil, error.
function M.days(days)
	local n = tonumber(days)
	if math_type(n) ~= "integer" or n < 1 then
		return nil, ("days must be a whole number >= 1 (got %s)"):format(tostring(days))
	end
	return n
end

-- purge N: messages stored more than N days ago, of every host in this store.
function M.purge(db, days, now)
	local n, err = M.days(days)
	if not n then return nil, err end
	local count, perr, code = db:delete_older_than((now or M.now_us()) - n * DAY_US)
	return removed(count, perr, code, "purge")
end

-- orphans host: removes the queues of users that no longer exist.
function M.orphans(db, host, user_exists)
	local users, err, code = db:users(host)
	if not users then return fail("orphans", err, code) end
	local total, queues = 0, 0
	for _, u in ipairs(users) do
		if not user_exists(u.user, host) then
			local n, rerr, rcode = db:remove_user(host, u.user)
			if not n then return fail("orphans", rerr, rcode) end
			total, queues = total + n, queues + 1
		end
	end
	return true, ("Removed %d messages"):format(total), queues
end

return M
