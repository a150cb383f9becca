-- A core built without PostgreSQL support (make POSTGRES=no, or no libpq at build time): it
-- opens sqlite and memory stores as any build does, says it has no postgres backend, and asking
-- for one (core.open_postgres, or offline_store.open with backend = "postgres", as the plugin does
-- for offline_backend = "postgres") is an error naming what is missing and how to rebuild.
-- Runs against build/nopg/offline_store/core.so (`make nopostgres`; make test and make test-asan
-- build it), in a child process, so the core this process loaded does not matter.

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local support = require "support.util"

local ROOT = select(2, support.sh("pwd")):gsub("%s+$", "")
local NOPG = ROOT .. "/build/nopg"
local LUA = os.getenv("LUA") or "lua5.4"
local MISSING = "offline_store.core was built without PostgreSQL support (libpq): rebuild it with libpq's headers "
	.. "installed (Debian: libpq-dev) and `make POSTGRES=yes`"

-- Runs `code` in a child Lua whose offline_store.core is the one built without PostgreSQL
-- (the sanitizer runtime, when this process has it preloaded, is not passed on: that core is
-- not instrumented). Returns its output.
local function in_nopg_core(code)
	local ok, out = support.sh(("make -s -C %s nopostgres"):format(support.quote(ROOT)))
	lu.assertTrue(ok, "make nopostgres: " .. out)
	local prelude = ("package.path = %q; package.cpath = %q\n"):format(
		ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua;" .. package.path, NOPG .. "/?.so")
	ok, out = support.sh(("env -u LD_PRELOAD %s -e %s 2>&1"):format(LUA, support.quote(prelude .. code)))
	lu.assertTrue(ok, out)
	return out
end

TestCoreWithoutPostgres = {}

function TestCoreWithoutPostgres:test_it_says_so_and_still_opens_sqlite_and_memory()
	local out = in_nopg_core([[
		local core = require "offline_store.core"
		local dir = os.tmpname(); os.remove(dir)
		local db = assert(core.open_sqlite(dir))
		local mem = assert(core.open_memory())
		print(package.searchpath("offline_store.core", package.cpath), core.postgres,
			db:store("h", "u", "f", "<m/>", 1), mem:store("h", "u", "f", "<m/>", 1), db:backend(), mem:backend())
		db:close(); os.remove(dir); os.remove(dir .. "-wal"); os.remove(dir .. "-shm")
	]])
	lu.assertEquals(out, NOPG .. "/offline_store/core.so\tfalse\t1\t1\tsqlite\tmemory\n")
end

function TestCoreWithoutPostgres:test_open_postgres_names_what_is_missing()
	local out = in_nopg_core([[
		local core = require "offline_store.core"
		print(pcall(core.open_postgres, "host=127.0.0.1 dbname=prosody"))
	]])
	lu.assertStrContains(out, "false\t")
	lu.assertStrContains(out, MISSING)
end

-- What the plugin calls for offline_backend = "postgres": the error reaches the module's load.
function TestCoreWithoutPostgres:test_the_facade_raises_it_for_the_postgres_backend()
	local out = in_nopg_core([[
		local ok, err = pcall(require("offline_store").open, { backend = "postgres", postgres = "dbname=prosody" })
		print(ok, err)
		print(require("offline_store").open({ backend = "memory" }):backend())
	]])
	lu.assertStrContains(out, "false\t")
	lu.assertStrContains(out, MISSING)
	lu.assertStrContains(out, "\nmemory\n")
end

-- The build this process runs says whether it has the postgres backend, truthfully.
function TestCoreWithoutPostgres:test_the_normal_build_reports_its_choice()
	local core = require "offline_store.core"
	lu.assertEquals(type(core.postgres), "boolean")
	if core.postgres then
		local db, err = core.open_postgres("host=127.0.0.1 port=1 connect_timeout=1")
		lu.assertNil(db)
		lu.assertStrContains(err, "PostgreSQL")
	else
		lu.assertErrorMsgContains(MISSING, core.open_postgres, "dbname=x")
	end
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
