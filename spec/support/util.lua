-- Small helpers shared by the specs: temporary directories, files, shell quoting.

local M = {}

function M.quote(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Child commands run without LD_PRELOAD, so that the sanitizer runtime preloaded
-- into the spec process (make test-asan) does not judge /bin/sh and friends.
local function clean(cmd)
	return "exec env -u LD_PRELOAD sh -c " .. M.quote(cmd)
end

-- Runs a shell command; returns ok, combined output.
function M.sh(cmd)
	local f = assert(io.popen(clean("(" .. cmd .. ") 2>&1")))
	local out = f:read("a")
	local ok = f:close()
	return ok == true, out
end

-- Runs a shell command, output not captured; returns ok.
function M.exec(cmd)
	return os.execute(clean(cmd)) == true
end

function M.tmpdir()
	local ok, out = M.sh("mktemp -d /tmp/offline-store-spec.XXXXXX")
	assert(ok, out)
	return (out:gsub("%s+$", ""))
end

function M.rmrf(path)
	assert(path:match("^/tmp/offline%-store%-"), "refusing to remove " .. path)
	M.exec("rm -rf " .. M.quote(path))
end

-- A TCP port on 127.0.0.1 that nothing listens on right now.
function M.free_port()
	local s = assert(require "socket".bind("127.0.0.1", 0))
	local _, port = s:getsockname()
	s:close()
	return tonumber(port)
end

function M.read(path)
	local f = io.open(path, "rb")
	if not f then return nil end
	local s = f:read("a")
	f:close()
	return s
end

function M.write(path, data)
	local f = assert(io.open(path, "wb"))
	f:write(data)
	f:close()
end

return M
