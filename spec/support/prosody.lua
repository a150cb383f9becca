-- Test support: start and stop a real, throwaway Prosody on loopback for integration specs: the
-- system's, or the one PROSODY_BIN, PROSODYCTL_BIN and PROSODY_LIB name (the Makefile's PROSODY=13).
-- Each server gets a fresh temp dir (config, data, certs, plugins, logs) and free ports; plaintext
-- SASL PLAIN, no TLS, no s2s. Servers still running at exit are stopped (see "Safety net" below).
-- Usage: local srv = require("support.prosody").start{ users = { alice = "pw" } } ... srv:cleanup()

local socket = require "socket"

local concat, insert, remove, sort = table.concat, table.insert, table.remove, table.sort
local format = string.format
local execute, getenv, popen, open, remove_file = os.execute, os.getenv, io.popen, io.open, os.remove
local ipairs, pairs, next, select, setmetatable, tostring, tonumber, error, pcall =
	ipairs, pairs, next, select, setmetatable, tostring, tonumber, error, pcall
local sleep, gettime = socket.sleep, socket.gettime

local M = {}

local PROSODY = getenv("PROSODY_BIN") or "prosody"
local PROSODYCTL = getenv("PROSODYCTL_BIN") or "prosodyctl"
local HOST = "localhost"
local START_TIMEOUT, STOP_TIMEOUT, REAP_TIMEOUT = 10, 10, 5
local BASE_MODULES = { "roster", "saslauth", "disco", "ping", "admin_shell" } -- "posix" is autoloaded
local BASE_DISABLED = { "s2s" }

local live = {} -- every server started and not yet cleaned up, for stop_all()/the safety net

---------------------------------------------------------------------------------------------------
-- Helpers

-- Quote one argument for /bin/sh.
local function q(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function sh_ok(cmd)
	return execute(cmd) == true
end

-- Run a command, return ok(boolean) and its combined stdout+stderr.
local function sh_capture(cmd)
	local f = assert(popen(cmd .. " </dev/null 2>&1", "r"))
	local out = f:read("a")
	local ok = f:close()
	return ok == true, out
end

local function read_file(path)
	local f = open(path, "rb")
	if not f then return nil end
	local s = f:read("a")
	f:close()
	return s
end

-- The bytes of path from offset on, or "".
local function read_from(path, offset)
	local f = open(path, "rb")
	if not f then return "" end
	f:seek("set", offset)
	local s = f:read("a") or ""
	f:close()
	return s
end

local function write_file(path, data)
	local f = assert(open(path, "wb"))
	assert(f:write(data))
	assert(f:close())
end

local free_port = require "support.util".free_port

-- The version of the Prosody the specs run against ("0.12.3", "13.0.1"), and its branch ("0.12",
-- "13"), for specs whose server-side behaviour differs between versions.
M.version = (read_file((getenv("PROSODY_LIB") or "/usr/lib/prosody") .. "/prosody.version") or "")
	:match("^%s*(%S+)")
if not M.version then
	local f = assert(popen(q(PROSODYCTL) .. " about 2>/dev/null", "r"))
	M.version = f:read("a"):match("Prosody (%S+)") or "unknown"
	f:close()
end
M.branch = M.version:match("^0%.%d+") or M.version:match("^%d+") or M.version
-- Prosody 13 daemonizes and writes its pidfile before loading its hosts, and opens c2s before all
-- of them are activated: it is up once it logs this. 0.12 forks only once started.
local STARTED_LINE = M.branch ~= "0.12" and "Startup complete" or nil

local function port_open(port)
	local c = socket.tcp()
	c:settimeout(0.25)
	local ok = c:connect("127.0.0.1", port)
	c:close()
	return ok == 1
end

-- Prosody setuid()s to prosody_user when started as root unless run_as_root = true.
local IS_ROOT = select(2, sh_capture("id -u")):match("^%s*0%s*$") ~= nil

-- A Lua-literal list: { "a"; "b" }
local function lua_list(items)
	local out = {}
	for i, v in ipairs(items) do out[i] = format("%q", v) end
	return "{ " .. concat(out, "; ") .. " }"
end

local function append_all(dst, src)
	for _, v in ipairs(src or {}) do insert(dst, v) end
	return dst
end

-- "env K=V ... " prefix for commands (sorted for stable output), or "".
local function env_prefix(env)
	if not env or next(env) == nil then return "" end
	local keys = {}
	for k in pairs(env) do insert(keys, k) end
	sort(keys)
	local parts = { "env" }
	for _, k in ipairs(keys) do insert(parts, q(k .. "=" .. tostring(env[k]))) end
	return concat(parts, " ") .. " "
end

local function tail(text, n)
	if not text or text == "" then return "(empty)" end
	local lines = {}
	for line in text:gmatch("[^\n]*") do insert(lines, line) end
	local first = #lines - n + 1
	return concat(lines, "\n", first > 1 and first or 1)
end

-- Process state from /proc: a zombie counts as gone (PID 1 may not reap promptly).
local function alive(pid)
	local stat = pid and read_file("/proc/" .. pid .. "/stat")
	if not stat then return false end
	local state = stat:match("^%d+ %b() (%a)")
	return state ~= nil and state ~= "Z" and state ~= "X"
end

-- Wait until pid has exited; then, best effort, until it has been reaped too (no /proc entry), so
-- that `kill -0 pid` fails afterwards. Returns false if still running at the deadline.
local function wait_gone(pid, timeout)
	local deadline = gettime() + timeout
	while alive(pid) do
		if gettime() > deadline then return false end
		sleep(0.05)
	end
	local reap_deadline = gettime() + REAP_TIMEOUT
	while read_file("/proc/" .. pid .. "/stat") and gettime() < reap_deadline do
		sleep(0.05)
	end
	return true
end

---------------------------------------------------------------------------------------------------
-- Config

local function build_config(s, opts)
	local dir = s.dir
	local modules = append_all(append_all({}, BASE_MODULES), opts.modules_enabled)
	if opts.statistics then insert(modules, "http_openmetrics") end
	local lines = {
		"-- Generated by spec/support/prosody.lua: loopback-only test server, no TLS, no s2s.",
		format("pidfile = %q", dir .. "/prosody.pid"),
		format("data_path = %q", dir .. "/data"),
		format("certificates = %q", dir .. "/certs"),
		"plugin_paths = " .. lua_list(append_all(append_all({}, opts.plugin_paths), { dir .. "/plugins" })),
		format("admin_socket = %q", dir .. "/prosody.sock"),
		format("log = { debug = %q; error = %q }", dir .. "/prosody.log", dir .. "/error.log"),
		IS_ROOT and "run_as_root = true" or "",
		"prosodyctl_service_warnings = false",
		"",
		'interfaces = { "127.0.0.1" }',
		'local_interfaces = { "127.0.0.1" }',
		format("c2s_ports = { %d }", s.c2s_port),
		"c2s_direct_tls_ports = { }",
		"legacy_ssl_ports = { }",
		"s2s_ports = { }",
		"component_ports = { }",
		'http_interfaces = { "127.0.0.1" }',
		format("http_ports = { %d }", s.http_port),
		"https_ports = { }",
		"",
		"c2s_require_encryption = false",
		"allow_unencrypted_plain_auth = true",
		'authentication = "internal_plain"',
		'storage = "internal"',
		"",
		"modules_enabled = " .. lua_list(modules),
		"modules_disabled = " .. lua_list(append_all(append_all({}, BASE_DISABLED), opts.modules_disabled)),
	}
	if opts.statistics then
		insert(lines, 'statistics = "internal"')
		insert(lines, 'statistics_interval = "manual"')
	end
	insert(lines, opts.global or "")
	insert(lines, "")
	insert(lines, format("VirtualHost %q", HOST))
	insert(lines, opts.host or "")
	return concat(lines, "\n") .. "\n"
end

---------------------------------------------------------------------------------------------------
-- Server object

local Server = {}
Server.__index = Server

-- PID from the pidfile, or nil.
function Server:pid()
	local s = read_file(self.dir .. "/prosody.pid")
	return s and tonumber(s:match("%d+"))
end

-- Only signal a PID that really is this server's prosody (guards against stale pidfiles/PID reuse).
function Server:_owned_pid()
	local pid = self:pid() or self._pid
	if not pid or not alive(pid) then return nil end
	local cmdline = (read_file("/proc/" .. pid .. "/cmdline") or ""):gsub("%z", " ")
	if not cmdline:find(self.config, 1, true) then return nil end
	return pid
end

function Server:running()
	return self:_owned_pid() ~= nil
end

function Server:log()
	return read_file(self.dir .. "/prosody.log") or ""
end

function Server:prosodyctl(...)
	local args = { env_prefix(self.env) .. q(PROSODYCTL), "--config", q(self.config) }
	for i = 1, select("#", ...) do insert(args, q((select(i, ...)))) end
	return sh_capture(concat(args, " "))
end

-- Launch the daemon and wait until it is ready. On 0.12 `prosody -D` returns once mod_posix has
-- forked in "server-started" (listeners are up), but the daemon writes the pidfile only after the
-- fork, so wait for both an owned PID in the pidfile and the c2s port accepting connections; on 13
-- also for STARTED_LINE in the log written by this launch.
function Server:_launch()
	if self:running() then error("prosody already running in " .. self.dir, 2) end
	local console = self.dir .. "/console.log"
	local log_path = self.dir .. "/prosody.log"
	local log_from = #(read_file(log_path) or "")
	local cmd = format("%s%s -D --config %s >>%s 2>&1 </dev/null",
		env_prefix(self.env), q(PROSODY), q(self.config), q(console))
	self._pid = nil
	local launched = sh_ok(cmd)
	local deadline = gettime() + START_TIMEOUT
	local ready = false
	if launched then
		repeat
			self._pid = self:_owned_pid()
			ready = self._pid ~= nil and port_open(self.c2s_port)
				and (not STARTED_LINE or read_from(log_path, log_from):find(STARTED_LINE, 1, true) ~= nil)
			if not ready then sleep(0.05) end
		until ready or gettime() > deadline
	end
	if not ready then
		local why = not launched and "`prosody -D` failed"
			or not self._pid and format("no live PID in pidfile after %ds", START_TIMEOUT)
			or not port_open(self.c2s_port) and format("c2s port %d not accepting after %ds", self.c2s_port, START_TIMEOUT)
			or format("no %q in the log after %ds", STARTED_LINE, START_TIMEOUT)
		self:kill() -- in case it half-started
		error(format("prosody failed to start in %s (%s; KEEP_PROSODY_DIR=1 keeps the dir)."
			.. "\n--- console ---\n%s\n--- prosody.log (tail) ---\n%s",
			self.dir, why, tail(read_file(console), 20), tail(self:log(), 40)), 0)
	end
end

function Server:_signal_and_wait(sig, timeout)
	local pid = self:_owned_pid()
	if not pid then return true end
	sh_ok(format("kill -%s %d 2>/dev/null", sig, pid))
	return wait_gone(pid, timeout)
end

-- Clean stop: SIGTERM, wait up to 10 s, then SIGKILL.
function Server:stop()
	if not self:_signal_and_wait("TERM", STOP_TIMEOUT) then
		self:_signal_and_wait("KILL", STOP_TIMEOUT)
	end
	if self:running() then error("could not stop prosody in " .. self.dir, 2) end
	remove_file(self.dir .. "/prosody.pid") -- normally already removed on server-stopped
	return true
end

-- Crash: SIGKILL, wait, remove the stale pidfile.
function Server:kill()
	self:_signal_and_wait("KILL", STOP_TIMEOUT)
	if self:running() then error("could not kill prosody in " .. self.dir, 2) end
	remove_file(self.dir .. "/prosody.pid")
	return true
end

-- Writes a new config from `opts` (as M.start takes them; users aside) for the next start, keeping
-- the dir, data and ports: e.g. to switch from Prosody's own mod_offline to this one.
function Server:reconfigure(opts)
	write_file(self.config, build_config(self, opts))
end

-- Start again with the same dir, config and ports (stopping first if still running).
function Server:restart()
	if self:running() then self:stop() end
	self:_launch()
	return self
end

-- Stop and delete the dir (kept, and its path printed, when KEEP_PROSODY_DIR is set).
function Server:cleanup()
	if self.cleaned then return end
	self:stop()
	self.cleaned = true
	for i = #live, 1, -1 do
		if live[i] == self then remove(live, i) end
	end
	if getenv("KEEP_PROSODY_DIR") then
		io.stderr:write("[support.prosody] kept ", self.dir, "\n")
	elseif self.dir:match("^/tmp/offline%-store%-prosody%.[%w]+$") then
		sh_ok("rm -rf " .. q(self.dir))
	end
end

---------------------------------------------------------------------------------------------------
-- Module API

-- opts: plugin_paths, modules_enabled, modules_disabled, global, host, users, env, statistics
function M.start(opts)
	opts = opts or {}
	local ok, dir = sh_capture("mktemp -d /tmp/offline-store-prosody.XXXXXXXX")
	dir = dir:match("^%s*(.-)%s*$")
	if not ok or dir == "" then error("mktemp failed: " .. dir, 2) end
	assert(sh_ok(format("mkdir -p %s %s %s", q(dir .. "/data"), q(dir .. "/certs"), q(dir .. "/plugins"))))

	local self = setmetatable({
		dir = dir,
		config = dir .. "/prosody.cfg.lua",
		host = HOST,
		c2s_port = free_port(),
		http_port = free_port(),
		env = opts.env,
	}, Server)
	while self.http_port == self.c2s_port do self.http_port = free_port() end
	insert(live, self)

	local started, err = pcall(function ()
		write_file(self.config, build_config(self, opts))
		for user, password in pairs(opts.users or {}) do
			local rok, out = self:prosodyctl("register", user, HOST, password)
			if not rok then error(format("registering %s failed:\n%s", user, out), 0) end
		end
		self:_launch()
	end)
	if not started then
		pcall(self.cleanup, self)
		error(err, 2)
	end
	return self
end

-- Stop every server this process started and has not cleaned up.
function M.stop_all()
	for _, s in ipairs(live) do pcall(s.stop, s) end
end

-- Stop and remove every remaining server.
function M.cleanup_all()
	for i = #live, 1, -1 do pcall(live[i].cleanup, live[i]) end
end

---------------------------------------------------------------------------------------------------
-- Safety net: Lua has no atexit. A sentinel's __gc runs when the state is closed (normal end of
-- script, uncaught error, os.exit(code, true)); plain os.exit(code) skips finalizers, so it is
-- wrapped once to clean up first. Neither helps if this process is SIGKILLed.

M._sentinel = setmetatable({}, { __gc = function () M.cleanup_all() end })

do
	local real_exit = os.exit
	os.exit = function (...) -- luacheck: ignore 122
		M.cleanup_all()
		return real_exit(...)
	end
end

return M
