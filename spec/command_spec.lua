-- The operator's commands without a server: one dispatcher (offline_store.command) for
-- `prosodyctl mod_offline` and the live shell (offline_store.shell), and the C library
-- search (offline_store.loader).

local lu = require "luaunit"
local support = require "support.util"
local core = require "offline_store.core"
local command = require "offline_store.command"
local shell = require "offline_store.shell"
local loader = require "offline_store.loader"

local H = "example.org"
local HOSTS = { [H] = {} }

TestCommand = {}

function TestCommand:setUp()
	self.db = core.open_memory()
	self.now = require "offline_store.admin".now_us()
	self.db:store(H, "bob", "a@" .. H, "<message/>", self.now)
	self.db:store(H, "bob", "a@" .. H, "<message/>", self.now, self.now - 1)
	self.db:store(H, "gone", "a@" .. H, "<message/>", self.now)
	self.printed = {}
	local spec = self
	self.env = {
		hosts = HOSTS,
		with_store = function(name, fn)
			if name ~= H then return nil, "no such host: " .. tostring(name) end
			return fn(spec.db, H)
		end,
		user_exists = function(user, h) return h == H and user ~= "gone" end,
		print = function(line) spec.printed[#spec.printed + 1] = line end,
	}
end

function TestCommand:test_each_command()
	lu.assertEquals({ command.run(self.env, "count", "Bob@Example.org") },
		{ true, ("bob@%s has 2 offline messages (%d bytes)"):format(H, 20) })
	lu.assertEquals({ command.run(self.env, "list", "bob@" .. H, "1") }, { true, "Listed 1 of 2 offline messages of bob@" .. H })
	lu.assertEquals(#self.printed, 1)
	lu.assertEquals({ command.run(self.env, "expire", H) }, { true, "Removed 1 messages" })
	lu.assertEquals({ command.run(self.env, "orphans", H) }, { true, "Removed 1 messages", 1 })
	lu.assertEquals({ command.run(self.env, "purge", H, "1") }, { true, "Removed 0 messages" })
	lu.assertEquals({ command.run(self.env, "delete", "bob@" .. H) }, { true, "Removed 1 messages" })
	lu.assertEquals(self.db:count(H, "bob"), 0)
end

function TestCommand:test_errors_and_unknown_commands()
	lu.assertEquals({ command.run(self.env, "count", "bob@elsewhere") }, { nil, "no such host: elsewhere" })
	lu.assertEquals({ command.run(self.env, "count", H) }, { nil, "expected a bare JID user@host (got example.org)" })
	lu.assertEquals({ command.run(self.env, "purge", H, "0") }, { nil, "days must be a whole number >= 1 (got 0)" })
	lu.assertEquals({ command.run(self.env, "list", "bob@" .. H, "x") }, { nil, "max must be a whole number >= 1 (got x)" })
	lu.assertEquals({ command.run(self.env, "frobnicate") }, { nil, nil })
	lu.assertEquals(self.db:count(H, "bob"), 2, "nothing removed")
end

function TestCommand:test_prosodyctl_opens_and_closes_the_store_and_prints()
	local out, opened = {}, {}
	local dir = support.tmpdir()
	local env = {
		hosts = HOSTS, user_exists = function() return true end, print = function(line) out[#out + 1] = line end,
		read_options = function() return { store = { backend = "sqlite" } } end,
		open = function() local db = assert(core.open_sqlite(dir .. "/c.sqlite")); opened[#opened + 1] = db; return db end,
	}
	lu.assertEquals(command.prosodyctl({ "count", "bob@" .. H }, env), 0)
	lu.assertEquals(out, { "bob@example.org has 0 offline messages (0 bytes)" })
	lu.assertStrContains(tostring(opened[1]), "closed")
	lu.assertEquals(command.prosodyctl({ "purge", H, "-2" }, env), 1)
	lu.assertEquals(out[2], "Error: days must be a whole number >= 1 (got -2)")
	lu.assertEquals(#opened, 1, "a bad argument opens nothing")
	lu.assertEquals(command.prosodyctl({}, env), 1)
	lu.assertEquals(out[3], command.USAGE)
	env.read_options = function() return { store = { backend = "memory" } } end
	lu.assertEquals(command.prosodyctl({ "expire", H }, env), 1)
	lu.assertStrContains(out[4], "the memory backend lives inside the running server")
	support.rmrf(dir)
end

function TestCommand:test_shell_runs_the_same_commands_on_the_live_stores()
	local printed = {}
	local self_ = { session = { print = function(line) printed[#printed + 1] = line end } }
	local sh = shell.new({ [H] = self.db }, { ["down.example"] = "bad option" },
		{ [H] = {}, ["down.example"] = {} }, function(user) return user ~= "gone" end)
	lu.assertEquals({ sh.count(self_, "bob@" .. H) }, { true, ("bob@%s has 2 offline messages (%d bytes)"):format(H, 20) })
	lu.assertEquals({ sh.list(self_, "bob@" .. H) }, { true, "Listed 2 of 2 offline messages of bob@" .. H })
	lu.assertEquals(#printed, 2)
	lu.assertEquals({ sh.orphans(self_, H) }, { true, "Removed 1 messages", 1 })
	lu.assertEquals({ sh.expire(self_, "down.example") }, { nil, "mod_offline is not loaded on down.example: bad option" })
	lu.assertEquals(#shell.items(sh), #shell.COMMANDS)
	lu.assertIs(shell.items(sh)[1].handler, sh.count)
end

-- shell.install, as a host's mod_offline calls it: the `offline` table in the admin shell's
-- environment, the commands given as process-wide "shell-command" items and, while the
-- console's `help` is 0.12's function, `help offline`; again when mod_admin_shell loads.
function TestCommand:test_shell_install()
	local shared, hooks, fired = {}, {}, {}
	local module = {
		shared = function(_, path) shared[path] = shared[path] or {}; return shared[path] end,
		hook_global = function(_, name, fn) hooks[name] = fn end,
	}
	local server = { hosts = { [H] = {} }, events = { fire_event = function(name, data) fired[#fired + 1] = { name, data } end } }
	local help_lines = {}
	local function help(session) session.print("the usual help") end
	module:shared("/*/admin_shell/commands").help = help
	module:shared("/*/offline/stores")[H] = self.db
	local sh = shell.install(module, server, function() return true end)
	lu.assertIs(module:shared("/*/admin_shell/env").offline, sh)
	lu.assertEquals({ sh:count("bob@" .. H) }, { true, ("bob@%s has 2 offline messages (%d bytes)"):format(H, 20) })
	module:shared("/*/offline/problems")["down.example"] = "bad option"
	server.hosts["down.example"] = {}
	lu.assertEquals({ sh:count("bob@down.example") }, { nil, "mod_offline is not loaded on down.example: bad option" })
	lu.assertEquals(#fired, #shell.COMMANDS)
	lu.assertEquals(fired[1][1], "item-added/shell-command")
	lu.assertIs(fired[1][2].source, module)
	lu.assertIs(fired[1][2].item.handler, sh.count)
	local wrapped = module:shared("/*/admin_shell/commands").help
	lu.assertNotIs(wrapped, help, "0.12's help: wrapped")
	wrapped({ print = function(line) help_lines[#help_lines + 1] = line end }, "help offline")
	lu.assertEquals(#help_lines, #shell.COMMANDS)
	hooks["module-loaded"]({ module = "saslauth" })
	lu.assertEquals(#fired, #shell.COMMANDS)
	hooks["module-loaded"]({ module = "admin_shell" })
	lu.assertEquals(#fired, 2 * #shell.COMMANDS, "given again to a new mod_admin_shell")
	lu.assertIs(module:shared("/*/admin_shell/commands").help, wrapped, "wrapped once")
end

TestLoader = {}

function TestLoader:setUp()
	self.saved = package.loaded["offline_store.core"]
	self.dir = support.tmpdir()
end

function TestLoader:tearDown()
	package.loaded["offline_store.core"] = self.saved
	support.rmrf(self.dir)
end

function TestLoader:test_candidates_in_order()
	lu.assertEquals(loader.candidates("/p", nil, "/usr/local"), { "/p/offline_store/core.so",
		"/p/../build/offline_store/core.so", "/p/../../../lib/lua/5.4/offline_store/core.so",
		"/usr/local/lib/lua/5.4/offline_store/core.so" })
	lu.assertEquals(loader.candidates("/p", "/x/core.so", "/usr/local"), { "/x/core.so" })
end

function TestLoader:test_loads_from_a_checkout_and_says_where()
	package.loaded["offline_store.core"] = nil
	local so = package.searchpath("offline_store.core", package.cpath)
	assert(support.sh(("mkdir -p %s/lua %s/build/offline_store && cp %s %s/build/offline_store/core.so"):format(
		self.dir, self.dir, support.quote(so), self.dir)))
	local lines = {}
	local c = loader.load(self.dir .. "/lua", nil, nil, function(_, fmt, ...) lines[#lines + 1] = fmt:format(...) end)
	lu.assertIsFunction(c.open_memory)
	lu.assertIs(package.loaded["offline_store.core"], c)
	lu.assertEquals(lines, { "Loaded offline_store.core from " .. self.dir .. "/lua/../build/offline_store/core.so" })
end

function TestLoader:test_errors_name_the_path()
	package.loaded["offline_store.core"] = nil
	local function err(...)
		local ok, e = pcall(loader.load, ...)
		lu.assertFalse(ok)
		return e
	end
	lu.assertEquals(err(self.dir, self.dir .. "/none.so", nil, print),
		"offline_library_path: no such file " .. self.dir .. "/none.so")
	support.write(self.dir .. "/bad.so", "not a library")
	lu.assertStrContains(err(self.dir, self.dir .. "/bad.so", nil, print), "offline_library_path: cannot load " .. self.dir .. "/bad.so: ")
	-- nothing found anywhere: every place looked at is named
	local cpath = package.cpath
	package.cpath = ""
	local e = err(self.dir, nil, nil, print)
	package.cpath = cpath
	lu.assertStrContains(e, "cannot find offline_store/core.so (looked in " .. self.dir .. "/offline_store/core.so, ")
	lu.assertStrContains(e, "set offline_library_path to its absolute path")
end
