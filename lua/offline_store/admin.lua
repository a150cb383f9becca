-- offline_store.admin: the operator's commands, shared by the live shell
-- (`prosodyctl shell offline ...`) and `prosodyctl mod_offline ...`. Each takes an open
-- store and plain arguments and returns ok, message; `print` shows listing lines.

local datetime = require "util.datetime"
local jid_prepped_split = require "util.jid".prepped_split

local floor, type, tonumber, tostring, math_type = math.floor, type, tonumber, tostring, math.type
local ipairs, require = ipairs, require

local _ENV = nil
-- luacheck: std none

local M = {}

local DAY_US = 86400 * 1000000
-- The meta of a message set aside because it could not be delivered. Read
-- when first needed: this module is required before the plugin has found the
-- C library (the shell's commands must exist even when that fails).
local set_aside_meta
local function set_aside(meta)
	set_aside_meta = set_aside_meta or require "offline_store.core".SET_ASIDE
	return meta == set_aside_meta
end

function M.now_us()
	return floor(require "util.time".now() * 1000000)
end

-- Normalises a JID as typed (nodeprep, nameprep) and splits it; returns user,
-- host, resource, or nil, error for a string that is not a valid JID.
local function prepped(jid)
	local user, host, resource
	if type(jid) == "string" then user, host, resource = jid_prepped_split(jid) end
	if not host then return nil, ("not a valid JID: %s"):format(tostring(jid)) end
	return { user = user, host = host, resource = resource }
end

-- A host name as typed, normalised; `hosts` (prosody.hosts) says which exist.
-- Returns host, or nil, error.
function M.host(name, hosts)
	local j, err = prepped(name)
	if not j then return nil, err end
	if j.user or j.resource then return nil, ("expected a host name (got %s)"):format(tostring(name)) end
	if not hosts[j.host] then return nil, "no such host: " .. j.host end
	return j.host
end

-- "user@host" as typed, normalised and split; `hosts` (prosody.hosts) says which
-- hosts exist. Returns user, host; or nil, error.
function M.user_jid(jid, hosts)
	local j, err = prepped(jid)
	if not j then return nil, err end
	if not j.user or j.resource then
		return nil, ("expected a bare JID user@host (got %s)"):format(tostring(jid))
	end
	if not hosts[j.host] then return nil, "no such host: " .. j.host end
	return j.user, j.host
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
	local n = 50
	if max ~= nil then n = tonumber(max) end
	if math_type(n) ~= "integer" or n < 1 then
		return nil, ("max must be a whole number >= 1 (got %s)"):format(tostring(max))
	end
	max = n
	local items, err, code = db:list(host, user, 0, max)
	if not items then return fail("list", err, code) end
	for _, it in ipairs(items) do
		print(("%d  %s  from %s  %d bytes%s%s"):format(it.id, datetime.datetime(it.ts // 1000000), it.from, #it.xml,
			it.expire and ("  expires " .. datetime.datetime(it.expire // 1000000)) or "",
			set_aside(it.meta) and "  [undeliverable]" or ""))
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
