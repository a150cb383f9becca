-- offline_store.options: the plugin's options for one host, read through a getter and
-- checked with errors that name the option; the names it knows (to warn about misspelt
-- ones); where a host's store lives, said without secrets, for the log; and what the
-- plugin says about its settings at load and at a config reload.

local offline_store = require "offline_store"
local limits = require "offline_store.limits"
local resolve_relative_path = require "util.paths".resolve_relative_path

local type, tostring, pairs, ipairs, select = type, tostring, pairs, ipairs, select
local sort, concat, min, max = table.sort, table.concat, math.min, math.max
local math_type, io_open = math.type, io.open

local _ENV = nil
-- luacheck: std none

local M = {}

-- Every option the plugin reads. An option that adds to these must be listed here,
-- or it is warned about as unknown at load.
M.KNOWN = {
	offline_backend = true, offline_store_groupchat_messages = true,
	offline_access_max_user_messages = true, offline_expiry_sweep = true,
	offline_access_max_user_bytes = true, offline_over_limit = true,
	offline_sqlite_file = true, offline_sqlite_synchronous = true, offline_sqlite_busy_timeout = true,
	offline_postgres = true, offline_library_path = true,
	offline_delivery_page = true, offline_delivery_lease = true, offline_node = true,
	offline_flexible_retrieval = true,
}

local SWEEPS = { hourly = true, daily = true, weekly = true }
-- offline_over_limit: what becomes of a message over the recipient's limits.
local OVER_LIMIT = { bounce = true, drop = true, drop_oldest = true }

-- Facade fields, by the Prosody option they come from.
local FIELD_OPTION = { file = "offline_sqlite_file", synchronous = "offline_sqlite_synchronous",
	busy_timeout = "offline_sqlite_busy_timeout", backend = "offline_backend", postgres = "offline_postgres" }

local function want(name, ok, v, accepted)
	if ok then return true end
	return nil, ("%s must be %s (got %s)"):format(name, accepted, type(v) == "string" and ("%q"):format(v) or tostring(v))
end

-- Reads one host's settings. get(name) returns an option's value or nil;
-- data_path resolves a relative sqlite file. Returns a settings table
-- { groupchat, rule_name, rule_named, bytes_rule_name, bytes_rule_named, over_limit,
-- sweep, store = { backend, ... } }, or nil
-- and an error that names the option.
function M.read(get, data_path)
	local function opt(name, default)
		local v = get(name)
		if v == nil then return default end
		return v
	end
	local s = {}
	local backend_option = opt("offline_backend", "sqlite")
	local ok, err = want("offline_backend", type(backend_option) == "string", backend_option, "a string")
	if not ok then return nil, err end
	s.groupchat = opt("offline_store_groupchat_messages", false)
	ok, err = want("offline_store_groupchat_messages", type(s.groupchat) == "boolean", s.groupchat, "true or false")
	if not ok then return nil, err end
	s.rule_named = get("offline_access_max_user_messages") ~= nil
	s.rule_name = opt("offline_access_max_user_messages", limits.DEFAULT_RULE_NAME)
	s.bytes_rule_named = get("offline_access_max_user_bytes") ~= nil
	s.bytes_rule_name = opt("offline_access_max_user_bytes", limits.DEFAULT_BYTES_RULE_NAME)
	s.over_limit = opt("offline_over_limit", "bounce")
	ok, err = want("offline_over_limit", OVER_LIMIT[s.over_limit], s.over_limit, '"bounce", "drop" or "drop_oldest"')
	if not ok then return nil, err end
	s.sweep = opt("offline_expiry_sweep", "daily")
	ok, err = want("offline_expiry_sweep", s.sweep == false or SWEEPS[s.sweep], s.sweep,
		'"hourly", "daily", "weekly" or false')
	if not ok then return nil, err end

	s.page = opt("offline_delivery_page", 100)
	ok, err = want("offline_delivery_page", math_type(s.page) == "integer" and s.page >= 1 and s.page <= 100000, s.page,
		"a whole number from 1 to 100000")
	if not ok then return nil, err end
	s.lease = opt("offline_delivery_lease", 300)
	ok, err = want("offline_delivery_lease", type(s.lease) == "number" and s.lease >= 10 and s.lease <= 86400, s.lease,
		"a number of seconds from 10 to 86400")
	if not ok then return nil, err end
	s.node = opt("offline_node", nil)
	ok, err = want("offline_node", s.node == nil or (type(s.node) == "string" and s.node:match("^[%w%.%-_:@]+$")), s.node,
		"a name of letters, digits and . - _ : @")
	if not ok then return nil, err end
	s.node = s.node or M.machine_name()
	s.flexible = opt("offline_flexible_retrieval", true)
	ok, err = want("offline_flexible_retrieval", type(s.flexible) == "boolean", s.flexible, "true or false")
	if not ok then return nil, err end

	local backend, berr = offline_store.resolve_backend(backend_option, get("offline_postgres") ~= nil)
	if not backend then return nil, "offline_backend: " .. berr end
	s.store = { backend = backend }
	if backend == "sqlite" then
		local file = opt("offline_sqlite_file", "offline.sqlite")
		ok, err = want("offline_sqlite_file", type(file) == "string" and file ~= "", file, "a file path")
		if not ok then return nil, err end
		s.store.file = resolve_relative_path(data_path, file)
		s.store.synchronous = opt("offline_sqlite_synchronous", "normal")
		s.store.busy_timeout = opt("offline_sqlite_busy_timeout", 2000)
	elseif backend == "postgres" then
		s.store.postgres = get("offline_postgres")
	end
	local _, cerr = offline_store.check_config(s.store)
	if cerr then
		-- name the Prosody option, not the facade's field
		return nil, (cerr:gsub("^([%w_]+)", function(field) return FIELD_OPTION[field] or field end))
	end
	return s
end

-- offline_node's default: this machine's name (stable across restarts, so that
-- a restarted node releases its own leases at once).
function M.machine_name()
	local f = io_open("/proc/sys/kernel/hostname") or io_open("/etc/hostname")
	local name = f and f:read("l")
	if f then f:close() end
	name = name and name:match("^[%w%.%-_:@]+$")
	return name or "node"
end

-- The options (sorted names) whose change between two settings' stores needs the
-- store opened again.
function M.store_changes(old, new)
	local a, b = offline_store.check_config(old), offline_store.check_config(new)
	local out = {}
	for field, option in pairs(FIELD_OPTION) do
		if a[field] ~= b[field] then out[#out + 1] = option end
	end
	sort(out)
	return out
end

-- Levenshtein distance, for suggesting the option that was meant.
local function distance(a, b)
	local prev = {}
	for j = 0, #b do prev[j] = j end
	for i = 1, #a do
		local cur = { [0] = i }
		for j = 1, #b do
			local cost = a:byte(i) == b:byte(j) and 0 or 1
			cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
		end
		prev = cur
	end
	return prev[#b]
end

-- The unknown offline_* names among the keys of each given option table (e.g. a
-- host's section and the global one), sorted, each as a warning text that names the
-- closest known option when there is one near enough.
function M.unknown(...)
	local seen, out = {}, {}
	for i = 1, select("#", ...) do
		local options = select(i, ...)
		for name in pairs(options or {}) do
			if type(name) == "string" and name:match("^offline_") and not M.KNOWN[name] and not seen[name] then
				seen[name] = true
				local best, best_d
				for known in pairs(M.KNOWN) do
					local d = distance(name, known)
					if d <= 3 and (not best_d or d < best_d or (d == best_d and known < best)) then best, best_d = known, d end
				end
				out[#out + 1] = ("unknown option %s is ignored%s"):format(name,
					best and (" (did you mean " .. best .. "?)") or "")
			end
		end
	end
	sort(out)
	return out
end

-- Splits a libpq connection string (key=value words, or a postgres:// URI) into
-- host, port and dbname: the password never reaches a log line.
local function conninfo_fields(conninfo)
	local f = {}
	local uri = conninfo:match("^postgres[%w]*://(.*)$")
	if uri then
		local authority, path = uri:match("^([^/?]*)/?([^?]*)")
		local hostport = authority:match("@([^@]*)$") or authority
		f.host, f.port = hostport:match("^([^:]*):?(%d*)$")
		f.dbname = path
	else
		for key, value in conninfo:gmatch("(%w+)%s*=%s*('?[^' ]*'?)") do
			f[key] = value:gsub("^'(.*)'$", "%1")
		end
	end
	return f
end

-- Where a store's data lives, for the info line at load.
function M.where(store)
	if store.backend == "sqlite" then return "sqlite file " .. store.file end
	if store.backend == "memory" then return "memory (inside the server process, lost at restart)" end
	local conninfo = offline_store.check_config(store).postgres
	local f = conninfo_fields(conninfo)
	local parts = {}
	for _, key in ipairs { "host", "port", "dbname" } do
		if f[key] and f[key] ~= "" then parts[#parts + 1] = key .. "=" .. f[key] end
	end
	return "postgres " .. (#parts > 0 and concat(parts, " ") or "(libpq defaults)")
end

-- Opens the store of host `h` with settings `s`; or nil and an error that names the
-- backend, the host and the file.
function M.open_store(h, s)
	local db, err = offline_store.open(s.store)
	if db then return db end
	return nil, ("cannot open the %s offline store of %s%s: %s"):format(s.store.backend, h,
		s.store.file and (" (offline_sqlite_file = " .. s.store.file .. ")") or "", err)
end

-- What an operator should hear about at load and after a reload: misspelt options
-- (among those of the host's and the global section), a rule named but not defined
-- (access: the `access` option), and one line saying what runs. log(level, fmt, ...).
function M.report(s, what, host_options, global_options, access, log)
	for _, warning in ipairs(M.unknown(host_options, global_options)) do log("warn", "%s", warning) end
	local rule, defined = limits.describe(s.rule_name, access)
	if s.rule_named and not defined then
		log("warn", "offline_access_max_user_messages names the rule %q, which the access option does not define;"
			.. " the built-in default applies", s.rule_name)
	end
	local bytes_rule, bytes_defined = limits.describe(s.bytes_rule_name, access, true)
	if s.bytes_rule_named and not bytes_defined then
		log("warn", "offline_access_max_user_bytes names the rule %q, which the access option does not define;"
			.. " there is no byte limit", s.bytes_rule_name)
	end
	log("info", "%s: %s; limits %s; expiry sweep %s; %s; over the limit: %s", what, M.where(s.store), rule,
		s.sweep or "off", bytes_rule, s.over_limit)
end

-- The delivery page of settings `s`: a page above half of mod_smacks' queue
-- (smacks_max_queue_size) could make its queue overflow (with live traffic on top),
-- which loses resumption.
function M.page_size(s, smacks_queue, log)
	local limit = max(1, smacks_queue // 2)
	if s.page > limit then
		log("warn", "offline_delivery_page = %d is more than half of smacks_max_queue_size (%d); using %d",
			s.page, smacks_queue, limit)
		return limit
	end
	return s.page
end

-- At a config reload, new settings `s` keep the running ones' store and node (those
-- take effect when the module is reloaded), and say so.
function M.keep_running(old, s, host, log)
	local changed = M.store_changes(old.store, s.store)
	if #changed > 0 then
		log("warn", "Config reload: %s changed; the store keeps running as it is until the module is reloaded"
			.. " (prosodyctl shell module reload offline %s)", concat(changed, ", "), host)
		s.store = old.store
	end
	if s.node ~= old.node then
		log("warn", "Config reload: offline_node changed; it takes effect when the module is reloaded")
		s.node = old.node
	end
end

return M
