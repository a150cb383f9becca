-- Test-only (spec/migrate_spec.lua): SIGKILLs this Prosody just before the Nth delete from
-- the "offline" archive store (Prosody's own mod_offline's), that is after mod_offline's
-- import has stored and committed a user's messages and before it deletes them there.
-- N is the option kill_at_bundled_delete (default 1). With kill_at_bundled_append = M it
-- kills just after the Mth append there instead: an export that has copied messages out and
-- not yet removed them here.

local at = module:get_option_number("kill_at_bundled_delete", 1)
local at_append = module:get_option_number("kill_at_bundled_append")
local getpid = require "util.pposix".getpid

-- (13 loads it as prosody.core.storagemanager; patched under each name that is a table)
local managers = {}
for _, name in ipairs { "core.storagemanager", "prosody.core.storagemanager" } do
	local ok, m = pcall(require, name)
	if ok and type(m) == "table" then managers[m] = true end
end

local seen, appended = 0, 0
for manager in pairs(managers) do
	local open = manager.open
	function manager.open(host, store, typ, ...)
		local s, err = open(host, store, typ, ...)
		if not s or store ~= "offline" or typ ~= "archive" then return s, err end
		local wrapper = {}
		function wrapper.append(_, user, ...)
			local id, aerr = s:append(user, ...)
			appended = appended + 1
			if appended == at_append then
				module:log("warn", "fault: SIGKILL after append %d to the bundled queue of %s", appended, user)
				os.execute("kill -KILL " .. getpid())
			end
			return id, aerr
		end
		function wrapper.delete(_, user, ...)
			seen = seen + 1
			if not at_append and seen == at then
				module:log("warn", "fault: SIGKILL before deleting the bundled queue of %s", user)
				os.execute("kill -KILL " .. getpid())
			end
			return s:delete(user, ...)
		end
		return setmetatable(wrapper, { __index = function(_, k)
			local v = s[k]
			if type(v) ~= "function" then return v end
			return function(_, ...) return v(s, ...) end
		end })
	end
	if at_append then
		module:log("info", "fault: armed, SIGKILL after append %d to the offline archive store", at_append)
	else
		module:log("info", "fault: armed, SIGKILL before delete %d from the offline archive store", at)
	end
end
