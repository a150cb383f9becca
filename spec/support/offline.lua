-- Helpers shared by the integration specs of mod_offline: a server with this checkout's
-- plugin, logged-in clients, message builders and filters over what a client received.

local server = require "support.prosody"
local xmpp = require "support.xmpp"
local support = require "support.util"
local st = require "util.stanza"

local M = {}

M.ROOT = select(2, support.sh("pwd")):gsub("%s+$", "")
M.PLUGINS = M.ROOT .. "/lua"
M.PW = "secret"
M.NS_DELAY = "urn:xmpp:delay"

-- The plugin_paths of a server with our plugin (opts.bundled: without it, so that Prosody
-- loads its own mod_offline), then opts.plugin_paths.
function M.plugin_paths(opts)
	local paths = opts.bundled and {} or { M.PLUGINS }
	for _, p in ipairs(opts.plugin_paths or {}) do paths[#paths + 1] = p end
	return paths
end

-- Starts a Prosody with our plugin directory first in plugin_paths (see M.plugin_paths).
-- Users default to a small cast, all with password M.PW.
function M.start(opts)
	opts = opts or {}
	opts.plugin_paths = M.plugin_paths(opts)
	opts.users = opts.users or { alice = M.PW, bob = M.PW, carol = M.PW, dave = M.PW, root = M.PW, boss = M.PW }
	return server.start(opts)
end

function M.login(srv, user, resource)
	return assert(xmpp.connect { port = srv.c2s_port, user = user, password = M.PW, resource = resource or "r" })
end

-- A client with initial presence sent and acknowledged, ready to send.
function M.online(srv, user, resource)
	local c = M.login(srv, user, resource)
	c:presence()
	c:ping()
	return c
end

-- A chat message; `build(m)` may add children, otherwise a body is added when given.
function M.chat(to, id, body, build)
	local m = st.message({ to = to, type = "chat", id = id })
	if body then m:tag("body"):text(body):up() end
	if build then build(m) end
	return m
end

function M.messages(list)
	local out = {}
	for _, s in ipairs(list) do
		if s.name == "message" then out[#out + 1] = s end
	end
	return out
end

function M.ids(list)
	local out = {}
	for i, s in ipairs(M.messages(list)) do out[i] = s.attr.id end
	return out
end

function M.delays(s)
	local out = {}
	for _, c in ipairs(s.tags) do
		if c.name == "delay" and c.attr.xmlns == M.NS_DELAY then out[#out + 1] = c end
	end
	return out
end

-- Logs `user` in on a fresh resource, checks that nothing arrives before initial
-- presence, sends it (with `priority`), and returns the messages delivered within
-- `seconds`, or until `expect` messages have arrived.
function M.collect_offline(srv, user, seconds, priority, expect)
	local c = M.login(srv, user, "fresh" .. math.random(1e9))
	local early = M.messages(c:collect(0.2))
	assert(#early == 0, "a message arrived before initial presence")
	c:presence(priority)
	local got = {}
	if expect then
		while #got < expect do
			local s = c:receive(seconds or 5)
			if not s then break end
			if s.name == "message" then got[#got + 1] = s end
		end
		for _, s in ipairs(M.messages(c:collect(0.3))) do got[#got + 1] = s end
	else
		got = M.messages(c:collect(seconds or 0.8))
	end
	c:close()
	return got
end

-- The parts of an error reply that the specs check.
function M.error_of(s)
	local NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
	local e = s:get_child("error")
	local cond
	for _, c in ipairs(e.tags) do
		if c.attr.xmlns == NS_STANZAS and c.name ~= "text" then cond = c.name end
	end
	return { type = s.attr.type, etype = e.attr.type, code = e.attr.code, condition = cond,
		text = e:get_child_text("text", NS_STANZAS) }
end

-- Runs prosodyctl on srv's config and returns its output, raising if it failed.
function M.ctl(srv, ...)
	local ok, out = srv:prosodyctl(...)
	assert(ok, table.concat({ ... }, " ") .. ": " .. out)
	return out
end

-- Runs sqlite3 on the server's default offline store file.
function M.sql(srv, query)
	local ok, out = support.sh("sqlite3 " .. support.quote(srv.dir .. "/data/offline.sqlite") .. " " .. support.quote(query))
	assert(ok, out)
	return out
end

-- VmRSS of a process in KiB.
function M.rss_kib(pid)
	local status = support.read("/proc/" .. pid .. "/status") or ""
	return tonumber(status:match("VmRSS:%s*(%d+)"))
end

-- A spec class that owns one server, started on first use (M.start(opts_fn())) and
-- stopped after the class.
function M.with_server(opts_fn)
	local T = {}
	function T:server()
		if not T.srv then T.srv = M.start(opts_fn()) end
		return T.srv
	end
	function T.teardownClass()
		if T.srv then T.srv:cleanup(); T.srv = nil end
	end
	return T
end

return M
