-- offline_store.limits: per-recipient limits through access rules and ACLs.
-- A rule is an ordered list of clauses { acl = NAME, value = N | "infinity" }; the
-- first clause whose ACL matches the recipient's bare JID gives the limit.

local type, ipairs, pairs, tostring, math_type = type, ipairs, pairs, tostring, math.type
local jid_split = require "util.jid".split
local concat = table.concat

local _ENV = nil
-- luacheck: std none

local M = {}

M.DEFAULT_RULE_NAME = "max_user_offline_messages"
-- The byte limit's rule (offline_access_max_user_bytes): no built-in default.
M.DEFAULT_BYTES_RULE_NAME = "max_user_offline_bytes"
-- Applies when the operator defines no rule of that name, and to recipients
-- that no clause of a defined rule matches.
M.DEFAULT_RULE = { { acl = "admin", value = 5000 }, { acl = "all", value = 100 } }

local BUILTIN = { all = true, admin = true }

local function describe(v)
	if type(v) == "string" then return ("%q"):format(v) end
	return tostring(v)
end

-- Compiles one ACL entry into a matcher(bare, host) -> boolean.
--   "user@host" matches that bare JID; "host" matches every user of that domain;
--   an entry with "*" is a pattern over the bare JID ("*@example.com", "bot-*@*").
local function entry_matcher(entry)
	if entry:find("*", 1, true) then
		local pattern = "^" .. entry:gsub("[%^%$%(%)%%%.%[%]%+%-%?]", "%%%0"):gsub("%*", ".*") .. "$"
		return function(bare) return bare:match(pattern) ~= nil end
	elseif entry:find("@", 1, true) then
		return function(bare) return bare == entry end
	end
	return function(_, host) return host == entry end
end

-- Checks the `acl` option; returns name -> matcher list, or nil, error.
local function compile_acls(acl, option)
	local out = {}
	if acl == nil then return out end
	if type(acl) ~= "table" then
		return nil, ("%s must be a table of ACL name = { JID, domain or pattern, ... } (got %s)"):format(option, describe(acl))
	end
	for name, entries in pairs(acl) do
		if type(name) ~= "string" then
			return nil, ("%s: ACL names must be strings (got %s)"):format(option, describe(name))
		end
		if BUILTIN[name] then
			return nil, ("%s.%s: %q is built in and cannot be redefined"):format(option, name, name)
		end
		if type(entries) ~= "table" or #entries == 0 then
			return nil, ("%s.%s must be a non-empty list of JIDs, domains or patterns (got %s)"):format(option, name, describe(entries))
		end
		local matchers = {}
		for i, entry in ipairs(entries) do
			if type(entry) ~= "string" or entry == "" then
				return nil, ("%s.%s[%d] must be a JID, a domain or a pattern string (got %s)"):format(option, name, i, describe(entry))
			end
			matchers[i] = entry_matcher(entry)
		end
		out[name] = matchers
	end
	return out
end

-- Checks a rule's clauses against the known ACLs; returns a clean copy or nil, error.
local function check_rule(rule, where, acls)
	if type(rule) ~= "table" or #rule == 0 then
		return nil, ("%s must be a non-empty list of { acl = NAME, value = N or \"infinity\" } (got %s)"):format(where, describe(rule))
	end
	local out = {}
	for i, clause in ipairs(rule) do
		local at = ("%s[%d]"):format(where, i)
		if type(clause) ~= "table" then
			return nil, ("%s must be a table { acl = NAME, value = N or \"infinity\" } (got %s)"):format(at, describe(clause))
		end
		local acl, value = clause.acl, clause.value
		if type(acl) ~= "string" or not (BUILTIN[acl] or acls[acl]) then
			return nil, ("%s.acl names an undefined ACL %s (defined: all, admin and those in the acl option)"):format(at, describe(acl))
		end
		if value ~= "infinity" and not (math_type(value) == "integer" and value >= 0) then
			return nil, ("%s.value must be a whole number >= 0 or \"infinity\" (got %s)"):format(at, describe(value))
		end
		out[i] = { acl = acl, value = value ~= "infinity" and value or nil }
	end
	return out
end

-- Builds the limit function for one host.
--   rule_name: the value of offline_access_max_user_messages (or, bytes, of
--   offline_access_max_user_bytes)
--   access, acl: the operator's `access` and `acl` options (may be nil)
--   is_admin(bare): the server's admin check
--   bytes: the byte limit's rule, which has no built-in default
-- Returns limit(bare) -> max count (or bytes; integer) or nil for "infinity", no
-- clause matching a byte rule included; false for a byte rule that `access` does
-- not define (no byte limit); or nil, error.
function M.compile(rule_name, access, acl, is_admin, bytes)
	local option = bytes and "offline_access_max_user_bytes" or "offline_access_max_user_messages"
	if type(rule_name) ~= "string" or rule_name == "" then
		return nil, ("%s must name an access rule (got %s)"):format(option, describe(rule_name))
	end
	if access ~= nil and type(access) ~= "table" then
		return nil, ("access must be a table of rule name = { clauses } (got %s)"):format(describe(access))
	end
	local acls, err = compile_acls(acl, "acl")
	if not acls then return nil, err end
	local defined = access and access[rule_name]
	local rule
	if defined ~= nil then
		rule, err = check_rule(defined, "access." .. rule_name, acls)
		if not rule then return nil, err end
	elseif bytes then
		return false
	end
	local default = bytes and {} or check_rule(M.DEFAULT_RULE, "default", acls)

	local function matches(name, bare, host)
		if name == "all" then return true end
		if name == "admin" then return is_admin(bare) == true end
		for _, m in ipairs(acls[name]) do
			if m(bare, host) then return true end
		end
		return false
	end

	local function evaluate(clauses, bare, host)
		for _, clause in ipairs(clauses) do
			if matches(clause.acl, bare, host) then return true, clause.value end
		end
		return false
	end

	return function(bare)
		local _, host = jid_split(bare)
		if rule then
			local found, value = evaluate(rule, bare, host)
			if found then return value end
		end
		local _, value = evaluate(default, bare, host)
		return value
	end
end

-- The limit functions of settings `s` (offline_store.options.read) under `access` and
-- `acl`: limit, and limit_bytes (false: no byte rule); or nil, error.
function M.for_settings(s, access, acl, is_admin)
	local limit, err = M.compile(s.rule_name, access, acl, is_admin)
	if not limit then return nil, err end
	local limit_bytes, berr = M.compile(s.bytes_rule_name, access, acl, is_admin, true)
	if limit_bytes == nil then return nil, berr end
	return limit, limit_bytes
end

-- Says which limits a host runs with, for the info line at load: the rule's name and
-- clauses, or the built-in default (bytes: none). `defined` is false when `access`
-- has no such rule.
function M.describe(rule_name, access, bytes)
	local rule = type(access) == "table" and access[rule_name] or nil
	if bytes and not rule then return ("no byte limit (no rule %s)"):format(rule_name), false end
	local clauses = {}
	for i, clause in ipairs(rule or M.DEFAULT_RULE) do
		clauses[i] = ("%s %s"):format(tostring(clause.acl), tostring(clause.value))
	end
	local text = ("%srule %s: %s%s"):format(bytes and "bytes " or "", rule_name, concat(clauses, ", "),
		rule and "" or " (built-in default)")
	return text, rule ~= nil
end

return M
