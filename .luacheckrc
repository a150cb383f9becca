-- luacheck over lua/, spec/ and bench/ (`make lint`, run by `make test`).
std = "lua54"
max_line_length = 150
-- `local _ENV = nil` in the library modules is there to be unused: a stray global is then
-- an error at load.
ignore = { "211/_ENV" }

-- The Prosody plugins: the module API and the server's globals.
files["lua/mod_offline.lua"] = {
	read_globals = { "prosody", "module" },
	globals = { "module.load", "module.save", "module.restore", "module.unload", "module.command" },
}
files["lua/mod_offline_stub.lua"] = { read_globals = { "prosody", "module" } }
files["spec/support/plugins/"] = { read_globals = { "prosody", "module" } }
files["bench/profile/"] = { read_globals = { "prosody", "module" } }

-- luaunit specs: the runner sets _RUNNER; the test classes are globals luaunit finds by name.
-- Their methods (TestX:test_y) need no self.
files["spec/"] = {
	allow_defined_top = true,
	self = false,
	globals = { "_RUNNER" },
	ignore = { "131/^Test" }, -- (luaunit finds the test classes as globals)
}
files["bench/"] = {
	globals = { "_RUNNER" },
}
