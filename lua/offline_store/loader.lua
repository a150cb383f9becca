-- offline_store.loader: finds and loads the C library (offline_store.core) for the
-- plugin. Prosody strips relative cpath entries and never puts the installer's lib dir
-- on cpath, so the plugin looks next to itself, in a source checkout and in a LuaRocks
-- tree first, then on package.cpath.

local io_open, pairs, pcall, require, error, concat = io.open, pairs, pcall, require, error, table.concat
local package = package

local _ENV = nil
-- luacheck: std none

local M = {}

local function file_exists(path)
	local f = io_open(path, "rb")
	if f then f:close() end
	return f ~= nil
end

-- The places looked at, in order: `explicit` (offline_library_path) alone when given;
-- else next to the plugin directory `dir`, a checkout, a LuaRocks tree and the
-- installer's prefix (prosody.paths.installer, may be nil).
function M.candidates(dir, explicit, installer)
	return explicit and { explicit } or {
		dir .. "/offline_store/core.so", -- next to the plugin
		dir .. "/../build/offline_store/core.so", -- a source checkout: lua/ beside build/
		dir .. "/../../../lib/lua/5.4/offline_store/core.so", -- a LuaRocks tree: share/lua/5.4 -> lib/lua/5.4
		installer and (installer .. "/lib/lua/5.4/offline_store/core.so"),
	}
end

-- Returns the offline_store.core module, or raises naming every place looked at.
-- log(level, fmt, ...) hears where it came from.
function M.load(dir, explicit, installer, log)
	if package.loaded["offline_store.core"] then return package.loaded["offline_store.core"] end
	local candidates = M.candidates(dir, explicit, installer)
	local tried = {}
	for _, path in pairs(candidates) do
		if file_exists(path) then
			local open, err = package.loadlib(path, "luaopen_offline_store_core")
			if not open then error(("offline_library_path: cannot load %s: %s"):format(path, err), 0) end
			package.loaded["offline_store.core"] = open("offline_store.core")
			log("debug", "Loaded offline_store.core from %s", path)
			return package.loaded["offline_store.core"]
		end
		tried[#tried + 1] = path
	end
	if explicit then
		error(("offline_library_path: no such file %s"):format(explicit), 0)
	end
	local ok, core = pcall(require, "offline_store.core")
	if ok then return core end
	error("cannot find offline_store/core.so (looked in " .. concat(tried, ", ")
		.. " and package.cpath); set offline_library_path to its absolute path", 0)
end

return M
