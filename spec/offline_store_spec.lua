-- The Lua facade: configuration checking, seed aliases, opening each backend.

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local support = require "support.util"
local offline_store = require "offline_store"

TestFacade = {}

function TestFacade:test_backend_names_and_aliases()
	local r = offline_store.resolve_backend
	lu.assertEquals(r(nil), "sqlite")
	lu.assertEquals(r("memory"), "memory")
	lu.assertEquals(r("mnesia"), "memory")
	lu.assertEquals(r("rdbms"), "sqlite")
	lu.assertEquals(r("rdbms", true), "postgres")
	local ok, err = r("riak")
	lu.assertNil(ok)
	lu.assertStrContains(err, "postgres")
	ok, err = r("mysql")
	lu.assertNil(ok)
	lu.assertStrContains(err, 'backend must be one of sqlite, memory, postgres (aliases: mnesia, rdbms) (got "mysql")')
	ok, err = r(42)
	lu.assertNil(ok)
	lu.assertStrContains(err, "backend must be a string")
end

function TestFacade:test_config_errors_name_the_field()
	local function err(cfg)
		local ok, e = offline_store.check_config(cfg)
		lu.assertNil(ok)
		return e
	end
	lu.assertStrContains(err({ backend = "memory", colour = "red" }),
		'unknown field "colour" (accepted: backend, busy_timeout, file, postgres, synchronous)')
	lu.assertStrContains(err({ backend = "sqlite" }), "file must be a non-empty path string")
	lu.assertStrContains(err({ file = "/tmp/x", synchronous = "sometimes" }), 'synchronous must be "normal" or "full" (got "sometimes")')
	lu.assertStrContains(err({ file = "/tmp/x", busy_timeout = 1.5 }), "busy_timeout must be a whole number")
	lu.assertStrContains(err({ file = "/tmp/x", busy_timeout = -1 }), "busy_timeout must be a whole number")
	-- sqlite takes an int: 4294967301 must not become 5 ms
	lu.assertStrContains(err({ file = "/tmp/x", busy_timeout = 4294967301 }),
		"busy_timeout must be a whole number of milliseconds from 0 to 2147483647 (got 4294967301)")
	lu.assertStrContains(err({ file = "/tmp/x", busy_timeout = 2147483648 }), "from 0 to 2147483647")
	lu.assertEquals(offline_store.check_config({ file = "/tmp/x", busy_timeout = 2147483647 }).busy_timeout, 2147483647)
	lu.assertStrContains(err("memory"), "configuration must be a table")
	lu.assertStrContains(err({ backend = "postgres" }), "postgres must be set for the postgres backend")
	lu.assertEquals(offline_store.check_config({ file = "/tmp/x" }),
		{ backend = "sqlite", file = "/tmp/x", synchronous = "normal", busy_timeout = 2000 })
end

function TestFacade:test_open_raises_on_bad_config_and_returns_fail_on_runtime_error()
	lu.assertErrorMsgContains("offline_store: unknown field", function() offline_store.open({ nope = 1 }) end)
	local db, msg, code = offline_store.open({ file = "/nonexistent/dir/x.sqlite" })
	lu.assertNil(db)
	lu.assertStrContains(msg, "unable to open database file")
	lu.assertIsNumber(code)
end

function TestFacade:test_open_each_backend()
	local mem = assert(offline_store.open({ backend = "mnesia" }))
	lu.assertEquals(mem:backend(), "memory")
	mem:close()
	local dir = support.tmpdir()
	local db = assert(offline_store.open({ backend = "rdbms", file = dir .. "/o.sqlite", synchronous = "full" }))
	lu.assertEquals(db:backend(), "sqlite")
	lu.assertEquals(db:store("h", "u", "f", "x", 1), 1)
	db:close()
	support.rmrf(dir)
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
