-- offline_store: opens a store from a configuration table.
-- Validates every field with an error that names it and the accepted values,
-- maps the seed's backend names onto ours, and hands back the C core's store
-- (doc/api.md describes its methods).

local core = require "offline_store.core"

local type, pairs, ipairs, tostring, tonumber, math_type = type, pairs, ipairs, tostring, tonumber, math.type
local concat, sort, error = table.concat, table.sort, error

local _ENV = nil
-- luacheck: std none

local M = { core = core, version = core.version }

-- What the seed's names mean is in resolve_backend.
local accepted_backends = "sqlite, memory, postgres (aliases: mnesia, rdbms)"

local fields = {
	backend = true, file = true, synchronous = true, busy_timeout = true, postgres = true,
}

local function field_list()
	local names = {}
	for name in pairs(fields) do names[#names + 1] = name end
	sort(names)
	return concat(names, ", ")
end

local function describe(v)
	if type(v) == "string" then return ("%q"):format(v) end
	return tostring(v)
end

-- Returns the backend name an operator's value stands for, or nil, error.
function M.resolve_backend(name, has_postgres)
	if name == nil then return "sqlite" end
	if type(name) ~= "string" then
		return nil, ("backend must be a string, one of %s (got %s)"):format(accepted_backends, describe(name))
	end
	if name == "mnesia" then return "memory" end
	if name == "rdbms" then return has_postgres and "postgres" or "sqlite" end
	if name == "riak" then
		return nil, "backend \"riak\" is not supported (it is deprecated in MongooseIM too); "
			.. "use \"postgres\" to share one store between several server nodes"
	end
	if name == "sqlite" or name == "memory" or name == "postgres" then return name end
	return nil, ("backend must be one of %s (got %s)"):format(accepted_backends, describe(name))
end

-- A Prosody-style `sql` table's fields, in the order they go into the conninfo.
local sql_fields = { { "host", "host" }, { "port", "port" }, { "database", "dbname" },
	{ "username", "user" }, { "password", "password" } }
local sql_accepted = "database, driver, host, password, port, username"

-- A libpq conninfo from `postgres`: a connection string as it is, or a Prosody-style
-- table { driver = "PostgreSQL", database =, username =, password =, host =, port = }.
local function postgres_conninfo(v)
	if type(v) == "string" then return v end
	if type(v) ~= "table" then
		return nil, ("postgres must be a libpq connection string or a table { driver = \"PostgreSQL\", "
			.. "database = ..., username = ..., password = ..., host = ..., port = ... } (got %s)"):format(describe(v))
	end
	local known = { driver = true }
	for _, f in ipairs(sql_fields) do known[f[1]] = true end
	for k in pairs(v) do
		if not known[k] then
			return nil, ("postgres has an unknown field %s (accepted: %s)"):format(describe(k), sql_accepted)
		end
	end
	if v.driver ~= nil and v.driver ~= "PostgreSQL" then
		return nil, ("postgres.driver must be \"PostgreSQL\" (got %s)"):format(describe(v.driver))
	end
	local parts = {}
	for _, f in ipairs(sql_fields) do
		local value = v[f[1]]
		if f[1] == "port" and value ~= nil then
			local n = tonumber(value)
			if math_type(n) ~= "integer" or n < 1 or n > 65535 then
				return nil, ("postgres.port must be a port number (got %s)"):format(describe(value))
			end
			value = tostring(n)
		elseif value ~= nil and type(value) ~= "string" then
			return nil, ("postgres.%s must be a string (got %s)"):format(f[1], describe(value))
		end
		if value ~= nil then
			parts[#parts + 1] = ("%s='%s'"):format(f[2], (value:gsub("[\\']", "\\%0")))
		end
	end
	return concat(parts, " ")
end

-- Checks a configuration table; returns a normalised copy, or nil, error.
function M.check_config(cfg)
	if type(cfg) ~= "table" then
		return nil, "configuration must be a table"
	end
	for k in pairs(cfg) do
		if not fields[k] then
			return nil, ("unknown field %s (accepted: %s)"):format(describe(k), field_list())
		end
	end
	local backend, err = M.resolve_backend(cfg.backend, cfg.postgres ~= nil)
	if not backend then return nil, err end
	local out = { backend = backend }
	if backend == "postgres" then
		if cfg.postgres == nil then
			return nil, "postgres must be set for the postgres backend: a libpq connection string "
				.. "(\"host=... dbname=...\") or a Prosody-style sql table"
		end
		local conninfo, perr = postgres_conninfo(cfg.postgres)
		if not conninfo then return nil, perr end
		out.postgres = conninfo
	end
	if backend == "sqlite" then
		if type(cfg.file) ~= "string" or cfg.file == "" then
			return nil, ("file must be a non-empty path string for the sqlite backend (got %s)"):format(describe(cfg.file))
		end
		out.file = cfg.file
		local sync = cfg.synchronous or "normal"
		if sync ~= "normal" and sync ~= "full" then
			return nil, ("synchronous must be \"normal\" or \"full\" (got %s)"):format(describe(sync))
		end
		out.synchronous = sync
		local busy = cfg.busy_timeout or 2000
		if math_type(busy) ~= "integer" or busy < 0 or busy > 0x7fffffff then -- (sqlite takes an int)
			return nil, ("busy_timeout must be a whole number of milliseconds from 0 to 2147483647 (got %s)")
				:format(describe(busy))
		end
		out.busy_timeout = busy
	end
	return out
end

-- Opens a store. A bad configuration raises (it is the caller's mistake);
-- a store that cannot be opened returns nil, message, code.
function M.open(cfg)
	local checked, err = M.check_config(cfg)
	if not checked then error("offline_store: " .. err, 2) end
	if checked.backend == "memory" then
		return core.open_memory()
	elseif checked.backend == "postgres" then
		return core.open_postgres(checked.postgres)
	end
	return core.open_sqlite(checked.file, checked.synchronous == "full", checked.busy_timeout)
end

return M
