-- offline_store.command: the operator's commands by name, one dispatcher for both
-- `prosodyctl mod_offline <command> ...` (its own process, on the store's file) and the
-- live shell's `offline` table (offline_store.shell, on the running server's stores).
-- What differs between the two is how a host's store is reached: `with_store`.

local admin = require "offline_store.admin"

local print, require = print, require

local _ENV = nil
-- luacheck: std none

local M = {}

M.USAGE = [[
Usage: prosodyctl mod_offline <command>
  count user@host        show how many messages are queued
  list user@host [max]   list queued messages (oldest first)
  delete user@host       delete a user's queue
  expire host            delete expired messages (every host in that host's store)
  purge host days        delete messages older than days (>= 1)
  orphans host           delete the queues of users that no longer exist
  import host            move what Prosody's own mod_offline queued into this store
  export host            move this store's queues into Prosody's own mod_offline store]]

-- Runs command `cmd` with its arguments a1, a2 (strings as typed). env:
--   hosts: prosody.hosts, which hosts exist
--   with_store(name, fn): fn(db, host) on the store of the host `name` names (typed), its
--     results returned; or nil, error
--   user_exists(user, host): the account check of `orphans`
--   print: where `list` writes its lines
--   prosodyctl: true in prosodyctl's process (import and export set up the host's storage)
-- Returns ok, message; or nil, nil for a command it does not know.
function M.run(env, cmd, a1, a2)
	local with_store = env.with_store
	local function by_jid(fn)
		local user, h = admin.user_jid(a1, env.hosts)
		if not user then return nil, h end
		return with_store(h, function(db) return fn(db, user, h) end)
	end
	if cmd == "count" then
		return by_jid(admin.count)
	elseif cmd == "list" then
		return by_jid(function(db, user, h) return admin.list(db, user, h, env.print, a2) end)
	elseif cmd == "delete" then
		return by_jid(admin.delete)
	elseif cmd == "expire" then
		return with_store(a1, function(db) return admin.expire(db) end)
	elseif cmd == "purge" then
		local days, err = admin.days(a2)
		if not days then return nil, err end
		return with_store(a1, function(db) return admin.purge(db, days) end)
	elseif cmd == "orphans" then
		return with_store(a1, function(db, h)
			return admin.orphans(db, h, function(user) return env.user_exists(user, h) end)
		end)
	elseif cmd == "import" or cmd == "export" then
		-- (offline_store.migrate needs Prosody's storage manager: required on use)
		local migrate = require "offline_store.migrate"
		return with_store(a1, function(db, h)
			local archive, err = migrate.bundled_store(h, env.prosodyctl)
			if not archive then return nil, err end
			return migrate[cmd](db, archive, h)
		end)
	end
	return nil, nil
end

-- `prosodyctl mod_offline ...`: opens the host's store for the one command, which is
-- safe next to a running server (sqlite's busy timeout and WAL). env: hosts, user_exists
-- and print as for run; read_options(host) -> settings | nil, err; open(host, settings) ->
-- db | nil, err. Returns the exit code.
function M.prosodyctl(arg, env)
	local hosts, read_options, open, out = env.hosts, env.read_options, env.open, env.print or print
	local function with_store(name, fn)
		local h, herr = admin.host(name, hosts)
		if not h then return nil, herr end
		local s, err = read_options(h)
		if not s then return nil, err end
		if s.store.backend == "memory" then
			return nil, "the memory backend lives inside the running server; use `prosodyctl shell offline ...`"
		end
		local db, oerr = open(h, s)
		if not db then return nil, oerr end
		local ok, msg = fn(db, h)
		db:close()
		return ok, msg
	end
	local ok, msg = M.run({ hosts = hosts, with_store = with_store, user_exists = env.user_exists, print = out,
		prosodyctl = true },
		arg[1], arg[2], arg[3])
	if ok then out(msg); return 0 end
	if msg then out("Error: " .. msg) else out(M.USAGE) end
	return 1
end

return M
