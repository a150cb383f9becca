-- offline_store.disabled: accounts disabled on Prosody 13 (`prosodyctl shell user disable`,
-- mod_user_account_management). A message for a disabled account is not stored: the
-- plugin declines it and Prosody bounces it as for an account that does not exist
-- (service-unavailable). The queue the account had is kept, and delivered at its first
-- login after it is enabled again. Prosody 0.12 has no disabled accounts: setup returns nil.
--
--   local is_disabled = disabled.setup(module, core)   -- nil on 0.12
--   is_disabled(username) -> true | false
-- The state is asked of the auth provider once per account, then kept (in C memory)
-- and updated by the user-disabled and user-enabled events.

local require = require

local _ENV = nil
-- luacheck: std none

local M = {}

local KEPT = 50000

function M.setup(module, core)
	local usermanager = require "core.usermanager"
	local user_is_enabled = usermanager.user_is_enabled
	if not user_is_enabled then return nil end
	local host = module.host
	local seen = core.cache(KEPT) -- username -> 1 disabled, 0 enabled

	local function set(event, v)
		if event.host == host then seen:set(event.username, v) end
	end
	-- (before mod_c2s closes the account's sessions at 200: what their mod_smacks queues
	-- give back goes the same way as the rest)
	module:hook_global("user-disabled", function(event) set(event, 1) end, 300)
	module:hook_global("user-enabled", function(event) set(event, 0) end, 300)
	module:hook_global("user-deleted", function(event) if event.host == host then seen:clear() end end)

	return function(username)
		local v = seen:get(username)
		if v == nil then
			local enabled = user_is_enabled(username, host)
			if enabled == nil then return false end -- (cannot tell: stored, not remembered)
			v = enabled and 0 or 1
			seen:set(username, v)
		end
		return v == 1
	end
end

return M
