-- Small helpers shared by the specs: temporary directories, files, shell quoting.

local M = {}

function M.quote(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs a shell command; returns ok, combined output.
function M.sh(cmd)
	local f = assert(io.popen("(" .. cmd .. ") 2>&1"))
	local out = f:read("a")
	local ok = f:close()
	return ok == true, out
end

function M.tmpdir()
	local ok, out = M.sh("mktemp -d /tmp/offline-store-spec.XXXXXX")
	assert(ok, out)
	return (out:gsub("%s+$", ""))
end

function M.rmrf(path)
	assert(path:match("^/tmp/offline%-store%-"), "refusing to remove " .. path)
	os.execute("rm -rf " .. M.quote(path))
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
