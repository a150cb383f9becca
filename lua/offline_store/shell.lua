-- offline_store.shell: the live shell's `offline` commands (`prosodyctl shell offline
-- count user@host`, or `offline:count("user@host")` in the console), their help, and
-- `help offline` in 0.12's console, whose help sections are fixed.

local admin = require "offline_store.admin"

local ipairs, type = ipairs, type

local M = {}

M.HELP = {
	{ "offline:count(jid)", "Show how many offline messages a user has queued, and their bytes" },
	{ "offline:list(jid, max)", "List a user's queued messages, oldest first (max 50 unless given)" },
	{ "offline:delete(jid)", "Delete a user's whole queue" },
	{ "offline:expire(host)", "Delete expired messages (every host in that host's store)" },
	{ "offline:purge(host, days)", "Delete messages older than days (>= 1)" },
	{ "offline:orphans(host)", "Delete the queues of users that no longer exist" },
	{ "offline:help()", "This list" },
}

function M.print_help(print)
	for _, h in ipairs(M.HELP) do print(h[1] .. " - " .. h[2]) end
end

-- The shell's `offline` table.
--   stores[host]: an open store of each host where the module runs
--   problems[host]: why the module is not running there (its load error)
--   hosts: prosody.hosts; user_exists(user, host): the server's account check
function M.new(stores, problems, hosts, user_exists)
	local shell = {}
	local function host_store(name)
		local h, err = admin.host(name, hosts)
		if not h then return nil, err end
		local s = stores[h]
		if s then return s, h end
		local why = problems[h]
		return nil, "mod_offline is not loaded on " .. h .. (why and (": " .. why) or "")
	end
	local function by_jid(jid, fn)
		local user, h = admin.user_jid(jid, hosts)
		if not user then return nil, h end
		local s, err = host_store(h)
		if not s then return nil, err end
		return fn(s, user, h)
	end
	function shell:count(jid) return by_jid(jid, admin.count) end
	function shell:list(jid, max)
		return by_jid(jid, function(s, user, h) return admin.list(s, user, h, self.session.print, max) end)
	end
	function shell:delete(jid) return by_jid(jid, admin.delete) end
	function shell:expire(name)
		local s, err = host_store(name)
		if not s then return nil, err end
		return admin.expire(s)
	end
	function shell:purge(name, days)
		local s, err = host_store(name)
		if not s then return nil, err end
		return admin.purge(s, days)
	end
	function shell:orphans(name)
		local s, h = host_store(name)
		if not s then return nil, h end
		return admin.orphans(s, h, user_exists)
	end
	function shell:help()
		M.print_help(self.session.print)
		return true, "mod_offline's commands; run as `prosodyctl shell offline count user@host`"
	end
	return shell
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
		if not section then session.print(row { "offline"; "Offline messages: count, list and delete queues (mod_offline)" }) end
	end
	commands.help = state.wrapper
end

return M
