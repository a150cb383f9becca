-- offline_store.migrate: moves queues between this module's store and the archive store
-- named "offline" that Prosody's bundled mod_offline keeps (through Prosody's storage API:
-- internal files, or SQL through mod_storage_sql), in both directions, in order, with
-- their stamps, and so that a crash at any point neither loses nor duplicates a message.
--
--   M.import(db, archive, host)      -> ok, message, moved, users, users_found
--   M.export(db, archive, host [, now]) -> ok, message, moved, users
--
-- `db` is an open offline store (or the plugin's stand-in for one), `archive` the host's
-- "offline" archive store (module:open_store("offline", "archive"), or M.bundled_store).
--
-- Import, one user at a time: every message of the bundled store is stored here with a
-- dedup key made of the bundled store's own id for it, the stores are committed, and
-- only then is the user's bundled queue deleted. A crash between the two leaves both
-- copies: the next import stores nothing again (the keys are there) and deletes the rest.
-- A delete that fails (no crash) takes back what this run stored, so that the messages
-- stay in one place.
-- Export, one user at a time: every deliverable message is appended to the bundled store
-- with its id here in the archive's `with` field (which the bundled module does not
-- read), then removed here. A crash between the two leaves both copies: the next export
-- appends only the messages whose id is not in the bundled store yet, and removes all.

local policy = require "offline_store.policy"

local floor, ipairs, pcall, tostring, tonumber, type = math.floor, ipairs, pcall, tostring, tonumber, type
local sort, concat = table.sort, table.concat
local require, error = require, error

local _ENV = nil
-- luacheck: std none

local M = {}

-- The dedup key of an imported message: the bundled store's id behind a NUL, which no
-- sender JID (the plugin's own keys start with one) can begin with.
local IMPORT_KEY = "\0bundled\0"
-- The `with` of an exported message: "offline-store:<id here>".
local EXPORT_MARK, EXPORT_PATTERN = "offline-store:", "^offline%-store:(%d+)$"
local LIST_PAGE = 1000

-- Prosody's own "offline" archive store of `host`, as the host's storage configuration
-- says (the server's, or prosodyctl's, which sets up a host's storage on first use).
function M.bundled_store(host, in_prosodyctl)
	local storagemanager = require "core.storagemanager"
	if in_prosodyctl then storagemanager.initialize_host(host) end
	local store, err = storagemanager.open(host, "offline", "archive")
	if not store then return nil, ("cannot open Prosody's offline archive store of %s: %s"):format(host, tostring(err)) end
	return store
end

-- Calls a method of a storage driver, which may return nil/false, err or raise.
local function call(store, method, ...)
	local ok, ret, err = pcall(store[method], store, ...)
	if not ok then return nil, ret end
	if ret == nil or ret == false then return nil, err or "failed" end
	return ret
end

-- The users with a bundled queue, sorted (collected before any is deleted: the internal
-- driver lists a directory whose files the deletes remove).
local function bundled_users(archive)
	if type(archive.users) ~= "function" then return nil, "the storage driver cannot list its users" end
	local list = {}
	local ok, err = pcall(function()
		local f, state, first = archive:users() -- (the internal driver's iterator needs its state)
		if not f then error(state or "failed", 0) end
		for user in f, state, first do list[#list + 1] = user end
	end)
	if not ok then return nil, err end
	sort(list)
	return list
end

-- A user's bundled queue, oldest first: { { key =, stanza =, when =, with = }, ... }.
local function bundled_items(archive, user)
	local it, err = call(archive, "find", user)
	if not it then return nil, err end
	local items = {}
	local ok, ierr = pcall(function()
		for key, stanza, when, with in it do
			items[#items + 1] = { key = key, stanza = stanza, when = when, with = with }
		end
	end)
	if not ok then return nil, ierr end
	return items
end

-- A user's queue here, oldest first, every page of it.
local function all_rows(db, host, user)
	local rows, after = {}, 0
	repeat
		local page, err, code = db:list(host, user, after, LIST_PAGE)
		if not page then return nil, ("listing failed: %s (code %s)"):format(tostring(err), tostring(code)) end
		for _, row in ipairs(page) do rows[#rows + 1] = row end
		if #page > 0 then after = page[#page].id end
	until #page < LIST_PAGE
	return rows
end

-- The ids of `user`'s messages here (a set), or nil, error.
local function ids_here(db, host, user)
	local rows, err = all_rows(db, host, user)
	if not rows then return nil, err end
	local set = {}
	for _, row in ipairs(rows) do set[row.id] = true end
	return set
end

-- Stores one user's bundled messages here and deletes them there. Returns the number
-- stored and the number found here already (stored by an import that a crash interrupted
-- before its delete, or copied there by an export that a crash interrupted before it
-- removed them here), or nil, error (then nothing was deleted there, and nothing stays
-- here that this run stored).
local function import_user(db, archive, host, user)
	local items, err = bundled_items(archive, user)
	if not items then return nil, "reading the bundled queue failed: " .. tostring(err) end
	if #items == 0 then return 0, 0 end
	local here = {} -- the ids here of the items an export copied there (read before db:begin)
	for _, item in ipairs(items) do
		item.exported = type(item.with) == "string" and tonumber(item.with:match(EXPORT_PATTERN))
		if item.exported and not here.read then
			local lerr
			here, lerr = ids_here(db, host, user)
			if not here then return nil, lerr end
			here.read = true
		end
	end
	local began, berr = db:begin()
	if began == nil then return nil, tostring(berr) end
	local ids = {} -- what this run stored, to take back if the delete fails
	for _, item in ipairs(items) do
		if not here[item.exported] then -- (else its original is still here)
			local stanza = item.stanza
			local ts = floor((tonumber(item.when) or 0) * 1000000)
			local _, expire = policy.times(stanza, ts)
			local n, id, code = db:store(host, user, stanza.attr.from or "", policy.stored_xml(stanza), ts, expire,
				nil, nil, nil, IMPORT_KEY .. tostring(item.key))
			if n then
				ids[#ids + 1] = id
			elseif n == nil then -- (inside a transaction: it is rolled back)
				if #ids > 0 and not began then db:remove(host, user, ids) end
				return nil, ("storing failed: %s (code %s)"):format(tostring(id), tostring(code))
			end -- false, "duplicate": an import before a crash stored it; it is deleted there now
		end
	end
	if began then
		local ok, cerr, code = db:commit()
		if not ok then return nil, ("committing failed: %s (code %s)"):format(tostring(cerr), tostring(code)) end
	end
	local deleted, derr = call(archive, "delete", user)
	if not deleted then
		if #ids > 0 then db:remove(host, user, ids) end
		return nil, "deleting the bundled queue failed: " .. tostring(derr)
	end
	return #ids, #items - #ids
end

-- Runs `each(user)` (-> moved, other | nil, error) for every user; returns the totals
-- of moved and other, the number of users with messages moved, and the failures.
local function over_users(users, host, each)
	local moved, other, with, failures = 0, 0, 0, {}
	for _, user in ipairs(users) do
		local n, err = each(user)
		if n then
			moved, other = moved + n, other + err
			if n > 0 then with = with + 1 end
		else
			failures[#failures + 1] = ("%s@%s: %s"):format(user, host, tostring(err))
		end
	end
	return moved, other, with, failures
end

local function summary(verb, where, moved, users, failures, extra)
	local msg = ("%s %d offline messages of %d users %s%s"):format(verb, moved, users, where, extra or "")
	if #failures > 0 then
		return nil, msg .. "; failed for " .. concat(failures, "; "), moved, users
	end
	return true, msg, moved, users
end

-- Moves every message of Prosody's own offline store of `host` into `db`.
function M.import(db, archive, host)
	local users, err = bundled_users(archive)
	if not users then return nil, "listing the users of Prosody's offline store failed: " .. tostring(err), 0, 0, 0 end
	local moved, found, with, failures = over_users(users, host, function(user)
		return import_user(db, archive, host, user)
	end)
	local ok, msg = summary("Imported", "from Prosody's own offline store", moved, with, failures,
		found > 0 and ("; %d more were here already (an import or export interrupted before it deleted them at its source)")
			:format(found) or nil)
	return ok, msg, moved, with, #users
end

-- Appends one user's deliverable messages to the bundled store and removes them here.
-- Returns the number moved, how many stay here (set aside, expired, unreadable), or nil,
-- error (then what was appended before the failure is removed here, and the rest stays).
local function export_user(db, archive, host, user, now, set_aside)
	local rows, err = all_rows(db, host, user)
	if not rows then return nil, err end
	local there, ferr = bundled_items(archive, user)
	if not there then return nil, "reading the bundled queue failed: " .. tostring(ferr) end
	local done = {} -- ids here of the messages that are in the bundled store now
	for _, item in ipairs(there) do
		local id = type(item.with) == "string" and tonumber(item.with:match(EXPORT_PATTERN))
		if id then done[id] = true end
	end
	local ids, kept, failure = {}, 0, nil
	for _, row in ipairs(rows) do
		local stanza = not set_aside(row.meta) and not (row.expire and row.expire <= now) and policy.stanza_of(row.xml)
		if not stanza then
			kept = kept + 1
		elseif done[row.id] then
			ids[#ids + 1] = row.id
		else
			local ok, aerr = call(archive, "append", user, nil, stanza, row.ts // 1000000, EXPORT_MARK .. row.id)
			if not ok then
				-- (the rest stays here, in order behind what went: nothing later goes first)
				failure = "appending to the bundled queue failed: " .. tostring(aerr)
				break
			end
			ids[#ids + 1] = row.id
		end
	end
	if #ids > 0 then
		local n, rerr, code = db:remove(host, user, ids)
		if not n then
			return nil, ("removing the exported messages here failed: %s (code %s); the next export removes them")
				:format(tostring(rerr), tostring(code))
		end
	end
	if failure then return nil, failure .. (" (%d moved before it)"):format(#ids) end
	return #ids, kept
end

-- Moves every deliverable message of `host` in `db` into Prosody's own offline store.
-- Messages set aside as undeliverable, expired ones and ones whose XML no longer parses
-- stay here.
function M.export(db, archive, host, now)
	now = now or floor(require "util.time".now() * 1000000)
	local users, err, code = db:users(host)
	if not users then
		return nil, ("listing the queues failed: %s (code %s)"):format(tostring(err), tostring(code)), 0, 0
	end
	local set_aside_meta = require "offline_store.core".SET_ASIDE
	local function set_aside(meta) return meta == set_aside_meta end
	local moved, kept, with, failures = over_users(users, host, function(u)
		return export_user(db, archive, host, u.user, now, set_aside)
	end)
	return summary("Exported", "to Prosody's own offline store", moved, with, failures,
		kept > 0 and ("; %d stay here (set aside as undeliverable, expired or unreadable)"):format(kept) or nil)
end

return M
