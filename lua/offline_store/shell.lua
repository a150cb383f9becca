-- offline_store.shell: the live shell's `offline` commands (`prosodyctl shell offline
-- count user@host`, or `offline:count("user@host")` in the console), their help, and
-- `help offline` in 0.12's console, whose help sections are fixed. Prosody 13's shell
-- takes them as "shell-command" items (M.items) and shows their help itself. M.install
-- puts all of it in place from a host's mod_offline.

local admin = require "offline_store.admin"
local command = require "offline_store.command"

local ipairs, type, concat, require, getmetatable = ipairs, type, table.concat, require, getmetatable

local _ENV = nil
-- luacheck: std none

local M = {}

-- Each command: name, arguments, description. The source of both shells' help.
M.COMMANDS = {
	{ "count", { "jid" }, "Show how many offline messages a user has queued, and their bytes" },
	{ "list", { "jid", "max" }, "List a user's queued messages, oldest first (max 50 unless given)" },
	{ "delete", { "jid" }, "Delete a user's whole queue" },
	{ "expire", { "host" }, "Delete expired messages (every host in that host's store)" },
	{ "purge", { "host", "days" }, "Delete messages older than days (>= 1)" },
	{ "orphans", { "host" }, "Delete the queues of users that no longer exist" },
	{ "import", { "host" }, "Move what Prosody's own mod_offline queued into this store" },
	{ "export", { "host" }, "Move this store's queues into Prosody's own mod_offline store" },
	{ "help", {}, "This list" },
}
M.SECTION_DESC = "Offline messages: count, list and delete queues (mod_offline)"

function M.print_help(print)
	for _, c in ipairs(M.COMMANDS) do
		print(("offline:%s(%s) - %s"):format(c[1], concat(c[2], ", "), c[3]))
	end
end

-- The commands as Prosody 13's "shell-command" items (section, name, args, handler),
-- whose handlers are `shell`'s own functions.
function M.items(shell)
	local items = {}
	for i, c in ipairs(M.COMMANDS) do
		local args = {}
		for j, name in ipairs(c[2]) do args[j] = { name = name, type = "string" } end
		items[i] = { section = "offline", section_desc = M.SECTION_DESC, name = c[1], desc = c[3],
			args = args, handler = shell[c[1]] }
	end
	return items
end

-- The shell's `offline` table: offline_store.command's commands on the server's stores.
--   stores[host]: an open store of each host where the module runs
--   problems[host]: why the module is not running there (its load error)
--   hosts: prosody.hosts; user_exists(user, host): the server's account check
function M.new(stores, problems, hosts, user_exists)
	local shell = {}
	local function with_store(name, fn)
		local h, err = admin.host(name, hosts)
		if not h then return nil, err end
		local s = stores[h]
		if s then return fn(s, h) end
		local why = problems[h]
		return nil, "mod_offline is not loaded on " .. h .. (why and (": " .. why) or "")
	end
	local function run(self, ...)
		return command.run({ hosts = hosts, with_store = with_store, user_exists = user_exists,
			print = self.session and self.session.print }, ...)
	end
	function shell:count(jid) return run(self, "count", jid) end
	function shell:list(jid, max) return run(self, "list", jid, max) end
	function shell:delete(jid) return run(self, "delete", jid) end
	function shell:expire(name) return run(self, "expire", name) end
	function shell:purge(name, days) return run(self, "purge", name, days) end
	function shell:orphans(name) return run(self, "orphans", name) end
	function shell:import(name) return run(self, "import", name) end
	function shell:export(name) return run(self, "export", name) end
	function shell:help()
		M.print_help(self.session.print)
		return true, "mod_offline's commands; run as `prosodyctl shell offline count user@host`"
	end
	return shell
end

-- Gives the commands to the console: to 13's shell as "shell-command" items, each
-- through add_item(item) (which fires its process-wide registry's event: a host
-- module's items would be per-host commands, whose dispatcher neither normalises the
-- JID nor says why the module is not loaded, and which leave with that host's module);
-- and to 0.12's, which takes no items, by wrapping its `help` (M.add_help).
function M.register(offline, add_item, commands, state)
	for _, item in ipairs(M.items(offline)) do add_item(item) end
	if not getmetatable(offline) then M.add_help(commands, state) end
end

-- From a host's mod_offline (`module`): the `offline` table in the admin shell's
-- environment, over the stores and problems every host's module shares, and its commands
-- given to the console now and whenever mod_admin_shell is loaded again. server: the
-- `prosody` global (hosts, events); user_exists(user, host): the account check.
function M.install(module, server, user_exists)
	local env = module:shared("/*/admin_shell/env")
	env.offline = M.new(module:shared("/*/offline/stores"), module:shared("/*/offline/problems"), server.hosts, user_exists)
	local function register()
		M.register(env.offline, function(item)
			server.events.fire_event("item-added/shell-command", { source = module, item = item })
		end, module:shared("/*/admin_shell/commands"), module:shared("/*/offline/shell"))
	end
	register()
	module:hook_global("module-loaded", function(event) if event.module == "admin_shell" then register() end end)
	return env.offline
end

-- Adds `help offline` and a line in the section list to the console's `help`
-- command (the shared `commands` table of mod_admin_shell). `state` is kept
-- across reloads so the wrapper is installed once.
function M.add_help(commands, state)
	local original = commands.help
	if type(original) ~= "function" or original == state.wrapper then return end
	local row = require "util.human.io".table({ { title = "Section"; width = 7 }; { title = "Description"; width = "100%" } })
	state.wrapper = function(session, line)
		local section = line:match("^help (%w+)")
		if section == "offline" then return M.print_help(session.print) end
		original(session, line)
		if not section then session.print(row { "offline"; M.SECTION_DESC }) end
	end
	commands.help = state.wrapper
end

return M
