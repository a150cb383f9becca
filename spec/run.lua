-- Runs luaunit spec files in one process: `lua5.4 spec/run.lua [luaunit options] spec/a_spec.lua ...`.
-- Sets the module paths to this checkout (lua/ and build/, or OFFLINE_STORE_CPATH for the
-- sanitizer build) and Prosody's libraries, loads every file, runs all Test* classes once, and ends with the line
-- "N passed, N failed, N skipped" that CI reads.

local root = arg[0]:match("^(.*)/spec/run%.lua$") or "."
-- Prosody's own libraries (util.stanza, util.xml, ...) come from the server the specs run against:
-- the installed one, or PROSODY_LIB (the Makefile's PROSODY=13).
local PROSODY_LIB = os.getenv("PROSODY_LIB") or "/usr/lib/prosody"
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. root .. "/spec/?.lua;"
	.. PROSODY_LIB .. "/?.lua;" .. package.path
package.cpath = (os.getenv("OFFLINE_STORE_CPATH") or (root .. "/build/?.so")) .. ";" .. package.cpath
	.. ";" .. PROSODY_LIB .. "/?.so"
-- Prosody 13's libraries require each other as "prosody.util.x"; its loader maps that to util.x.
local loader = io.open(PROSODY_LIB .. "/loader.lua")
if loader then loader:close(); require "loader" end

_RUNNER = true
local lu = require "luaunit"

local options, files = {}, {}
for _, a in ipairs(arg) do
	if a:match("_spec%.lua$") then files[#files + 1] = a else options[#options + 1] = a end
end
for _, f in ipairs(files) do dofile(f) end

local runner = lu.LuaUnit.new()
-- With no arguments luaunit would read the command line (our file names) itself.
if #options == 0 then options = { "-o", "text" } end
runner:runSuite(table.unpack(options))
local r = runner.result
print(("%d passed, %d failed, %d skipped"):format(r.successCount or (r.runCount - r.notSuccessCount - r.skippedCount),
	r.notSuccessCount, r.skippedCount))
-- Closing the state runs every __gc, so leak checkers see the core really free its memory.
os.exit(r.notSuccessCount == 0 and 0 or 1, true)
