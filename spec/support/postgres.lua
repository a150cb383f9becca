-- Test support: a throwaway PostgreSQL (Debian's packages) for the postgres specs and the bench.
-- initdb into a fresh /tmp dir, run as an unprivileged user (`postgres` when we are root), listen
-- on 127.0.0.1 on a free port with the unix socket inside the dir, stop and delete it afterwards.
-- Roles: `postgres` (trust, superuser) and `offline_pw` (password "secret", scram) to test wrong
-- credentials. Isolation: fresh_conninfo() makes a new schema and returns a conninfo whose
-- search_path is that schema, so every store opened on it starts empty.
--
--   local pg = require "support.postgres"
--   local srv = pg.server()      -- one per process, started on first use; nil + skip when the
--                                -- developer set OFFLINE_STORE_SKIP_POSTGRES=1; raises otherwise
--   srv.conninfo, srv:fresh_conninfo(), srv:fresh_database(), srv:psql(sql), srv:restart(),
--   srv:stop(), srv:start()
--
-- A server that cannot be started is an error (the specs fail, saying why), never a silent skip.
-- Stopped at exit (state close, os.exit) and, should this process be killed, by a watchdog.

local support = require "support.util"

local q, sh = support.quote, support.sh
local format = string.format

local M = {}

M.SKIP_VAR = "OFFLINE_STORE_SKIP_POSTGRES"
M.PASSWORD_ROLE, M.PASSWORD = "offline_pw", "secret"

local function getenv(name)
	local v = os.getenv(name)
	if v == "" then return nil end
	return v
end

-- True when the developer asked, explicitly, for the postgres specs to be skipped.
function M.skipping()
	local v = getenv(M.SKIP_VAR)
	return v ~= nil and v ~= "0"
end

local free_port = support.free_port

-- The directory with initdb, pg_ctl and psql: $PG_BIN, pg_config's, or the newest installed.
local function bindir()
	local dir = getenv("PG_BIN")
	if dir then return dir end
	local ok, out = sh("pg_config --bindir")
	dir = ok and out:gsub("%s+$", "")
	if dir and support.read(dir .. "/initdb") ~= nil then return dir end
	ok, out = sh("ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1")
	dir = ok and out:gsub("%s+$", "")
	if dir and dir ~= "" then return dir end
	return nil
end

local IS_ROOT = select(2, sh("id -u")):match("^%s*0%s*$") ~= nil

local function own_pid()
	local stat = support.read("/proc/self/stat")
	return stat and stat:match("^(%d+)")
end

local Server = {}
Server.__index = Server

-- A command run as the server's owner.
function Server:as_owner(cmd)
	if IS_ROOT then return "runuser -u postgres -- sh -c " .. q(cmd) end
	return cmd
end

function Server:run(cmd)
	return sh(self:as_owner(cmd))
end

function Server:log()
	return support.read(self.dir .. "/server.log") or ""
end

local function tail(text, n)
	local lines = {}
	for line in (text or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
	return table.concat(lines, "\n", math.max(1, #lines - n + 1))
end

-- Runs SQL through psql as the superuser on `db` (default: the test database); returns the
-- output (unaligned, tuples only) or raises.
function Server:psql(sql, db)
	local ok, out = sh(format("%s/psql -X -q -A -t -v ON_ERROR_STOP=1 -h %s -p %d -U postgres -d %s -c %s",
		q(self.bin), q(self.dir), self.port, q(db or self.db), q(sql)))
	if not ok then error("psql failed: " .. out, 2) end
	return (out:gsub("%s+$", ""))
end

-- A conninfo for `db` as `user` (default: the test database as the superuser, over TCP).
function Server:conninfo_for(extra)
	return format("host=127.0.0.1 port=%d dbname=%s user=postgres sslmode=disable gssencmode=disable%s",
		self.port, self.db, extra and (" " .. extra) or "")
end

-- A new, empty schema; the conninfo puts it first on the search_path. `settings`, if given,
-- are more server settings for the session ("-csynchronous_commit=off").
function Server:fresh_conninfo(settings)
	self.schemas = self.schemas + 1
	local name = format("t%d", self.schemas)
	self:psql(format("CREATE SCHEMA %s", name))
	return self:conninfo_for(format("options='-csearch_path=%s%s'", name, settings and (" " .. settings) or "")), name
end

-- A new, empty database (for clients that cannot set a search_path, such as a Prosody-style
-- sql table); returns its name.
function Server:fresh_database()
	self.schemas = self.schemas + 1
	local name = format("d%d", self.schemas)
	self:psql(format("CREATE DATABASE %s", name), "postgres")
	return name
end

function Server:running()
	return (self:run(format("%s/pg_ctl -D %s status", q(self.bin), q(self.data))))
end

-- Starts the (initialised) server and waits until it accepts connections.
function Server:start()
	local ok, out = self:run(format("%s/pg_ctl -D %s -l %s -w -t 60 start", q(self.bin), q(self.data),
		q(self.dir .. "/server.log")))
	if not ok then
		error(format("PostgreSQL did not start in %s:\n%s\n--- server.log ---\n%s", self.dir, out,
			tail(self:log(), 20)), 0)
	end
end

-- mode: "fast" (default; sessions are terminated, as by a service restart) or "immediate" (a crash).
-- Raises if the server is still running afterwards (with pg_ctl's output), so that a
-- spec that needs it down never goes on against a live server.
function Server:stop(mode)
	local ok, out = self:run(format("%s/pg_ctl -D %s -m %s -w -t 60 stop", q(self.bin), q(self.data), mode or "fast"))
	if not ok and self:running() then
		error(format("PostgreSQL did not stop in %s:\n%s\n--- server.log ---\n%s", self.dir, out, tail(self:log(), 20)), 0)
	end
end

function Server:restart(mode)
	self:stop(mode)
	self:start()
end

-- A shell command that, in the background, restarts the server as soon as `sql` (a query
-- run every 50 ms) answers "t", or after `timeout` seconds anyway. For a restart that must
-- land while a call is blocked in the server, whatever the machine's speed.
function Server:restart_when(sql, timeout, mode)
	local poll = format("%s/psql -X -q -A -t -h %s -p %d -U postgres -d %s -c %s", q(self.bin),
		q(self.dir), self.port, q(self.db), q(sql))
	return format("(i=0; while [ $i -lt %d ] && [ \"$(%s 2>/dev/null)\" != t ]; do sleep 0.05; i=$((i+1)); done; %s)"
		.. " >>%s 2>&1 &", math.floor(timeout * 20), poll,
		self:restart_command(mode), q(self.dir .. "/pg_ctl.log"))
end

-- A shell command that restarts the server after `delay` seconds, in the background.
function Server:restart_later(delay, mode)
	return format("(sleep %s; %s) >>%s 2>&1 &", delay, self:restart_command(mode), q(self.dir .. "/pg_ctl.log"))
end

-- What the background restarts above printed (for a failing spec's message).
function Server:restart_output()
	local text = support.read(self.dir .. "/pg_ctl.log")
	if not text then return "(no background restart output)" end
	return "background restart output:\n" .. tail(text, 20)
end

-- The pg_ctl restart the two above run (mode as for stop).
function Server:restart_command(mode)
	return self:as_owner(format("%s/pg_ctl -D %s -m %s -w -t 60 restart -l %s", q(self.bin), q(self.data),
		mode or "fast", q(self.dir .. "/server.log")))
end

function Server:cleanup()
	if self.cleaned then return end
	self.cleaned = true
	self:stop("immediate")
	if getenv("KEEP_POSTGRES_DIR") then
		io.stderr:write("[support.postgres] kept ", self.dir, "\n")
	else
		support.rmrf(self.dir)
	end
end

-- A spec/support/pg_proxy.lua process in front of this server (see there): its `port`, its
-- `dir` (arm, fired, blackhole, held), :conninfo(conninfo) (the same through the proxy),
-- :blackhole(on) and :stop(). Stopped at exit too.
local Proxy = {}
Proxy.__index = Proxy
local proxies = {}
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec/support"

function Server:proxy()
	local dir = support.tmpdir()
	local p = setmetatable({ dir = dir }, Proxy)
	proxies[#proxies + 1] = p
	local lua = getenv("LUA") or "lua5.4"
	assert(support.exec(format("%s %s %d %s >%s 2>&1 & echo $! >%s", lua, q(HERE .. "/pg_proxy.lua"),
		self.port, q(dir), q(dir .. "/proxy.log"), q(dir .. "/pid"))))
	local socket = require "socket"
	local deadline = socket.gettime() + 10
	while not support.read(dir .. "/port") do
		if socket.gettime() > deadline then
			error("the proxy did not start: " .. (support.read(dir .. "/proxy.log") or ""), 2)
		end
		socket.sleep(0.02)
	end
	p.port = tonumber(support.read(dir .. "/port"))
	return p
end

function Proxy:conninfo(conninfo)
	return (conninfo:gsub("port=%d+", "port=" .. self.port))
end

-- On: drops the open connections and holds new ones unanswered; off: forwards again.
-- Returns once the proxy has done it.
function Proxy:blackhole(on)
	if on then support.write(self.dir .. "/blackhole", "") else os.remove(self.dir .. "/blackhole") end
	local socket = require "socket"
	local want, deadline = on and "blackhole" or "forward", socket.gettime() + 10
	while support.read(self.dir .. "/state") ~= want do
		if socket.gettime() > deadline then error("the proxy did not switch to " .. want, 2) end
		socket.sleep(0.01)
	end
end

-- How many connections the blackhole holds (as the proxy last wrote it).
function Proxy:held()
	return tonumber(support.read(self.dir .. "/held") or "0")
end

function Proxy:stop()
	if self.stopped then return end
	self.stopped = true
	support.write(self.dir .. "/stop", "")
	local pid = support.read(self.dir .. "/pid")
	if pid and pid:match("^%d+") then support.exec("kill " .. pid:match("^%d+") .. " 2>/dev/null") end
	support.rmrf(self.dir)
end

local live = {}

-- Initialises and starts a new server; returns it, or raises with the reason.
-- opts.durable: keep PostgreSQL's default fsync (the bench); the specs run without it.
function M.start(opts)
	opts = opts or {}
	local bin = bindir()
	if not bin then error("no PostgreSQL server binaries (initdb, pg_ctl): install Debian's postgresql package", 0) end
	local mok, dir = sh("mktemp -d /tmp/offline-store-pg.XXXXXX")
	if not mok then error("mktemp failed: " .. dir, 0) end
	local self = setmetatable({ bin = bin, dir = dir:gsub("%s+$", ""), port = free_port(), db = "offline",
		schemas = 0 }, Server)
	self.data = self.dir .. "/data"
	live[#live + 1] = self
	local ok, err = pcall(function()
		if IS_ROOT then
			local cok, out = sh("chown postgres: " .. q(self.dir))
			if not cok then error("cannot hand " .. self.dir .. " to the postgres user: " .. out, 0) end
		end
		local iok, out = self:run(format("%s/initdb -D %s -U postgres -A trust -E UTF8 --locale=C --no-sync",
			q(bin), q(self.data)))
		if not iok then error("initdb failed:\n" .. out, 0) end
		-- Loopback only, socket in our dir; durable commits (no synchronous_commit = off), but no
		-- fsync: the specs crash the server, never the machine.
		support.write(self.dir .. "/extra.conf", table.concat({
			"listen_addresses = '127.0.0.1'",
			format("port = %d", self.port),
			format("unix_socket_directories = '%s'", self.dir),
			opts.durable and "" or "fsync = off", opts.durable and "" or "full_page_writes = off",
			"shared_buffers = 16MB", "max_connections = 60",
			"log_min_messages = warning", "deadlock_timeout = 200ms", "",
		}, "\n"))
		support.write(self.dir .. "/pg_hba.conf", table.concat({
			"local all all trust",
			format("host all %s 127.0.0.1/32 scram-sha-256", M.PASSWORD_ROLE),
			"host all all 127.0.0.1/32 trust", "",
		}, "\n"))
		local cok, cout = sh(format("cat %s >> %s && cp %s %s/pg_hba.conf && chown -R %s %s", q(self.dir .. "/extra.conf"),
			q(self.data .. "/postgresql.conf"), q(self.dir .. "/pg_hba.conf"), q(self.data),
			IS_ROOT and "postgres:" or "$(id -u)", q(self.data)))
		if not cok then error("configuring the cluster failed: " .. cout, 0) end
		self:start()
		self:psql(format("CREATE ROLE %s LOGIN PASSWORD %s", M.PASSWORD_ROLE, "'" .. M.PASSWORD .. "'"), "postgres")
		self:psql("CREATE DATABASE offline", "postgres")
		self:psql(format("GRANT ALL ON DATABASE offline TO %s; GRANT ALL ON SCHEMA public TO %s",
			M.PASSWORD_ROLE, M.PASSWORD_ROLE))
		-- Watchdog: should this process die without cleaning up, stop the server and delete it.
		local pid = own_pid()
		if pid then
			support.exec(format("setsid sh -c %s >/dev/null 2>&1 </dev/null &", q(format(
				"while kill -0 %s 2>/dev/null; do sleep 2; done; %s; rm -rf %s", pid,
				self:as_owner(format("%s/pg_ctl -D %s -m immediate stop", q(bin), q(self.data))), q(self.dir)))))
		end
	end)
	if not ok then
		pcall(self.cleanup, self)
		error(err, 0)
	end
	self.conninfo = self:conninfo_for()
	return self
end

function M.cleanup_all()
	for i = #proxies, 1, -1 do pcall(proxies[i].stop, proxies[i]); proxies[i] = nil end
	for i = #live, 1, -1 do pcall(live[i].cleanup, live[i]); live[i] = nil end
end

local shared, shared_err, told
-- The server shared by every spec of this process: nil when skipping (said once, on stderr);
-- raises, with the reason and how to skip, when it cannot be started.
function M.server()
	if M.skipping() then
		if not told then
			told = true
			io.stderr:write(format("\n*** %s is set: the PostgreSQL specs are SKIPPED ***\n", M.SKIP_VAR))
		end
		return nil
	end
	if shared then return shared end
	if shared_err then error(shared_err, 0) end
	local ok, srv = pcall(M.start)
	if not ok then
		shared_err = format("PostgreSQL could not be started for the postgres specs: %s\n"
			.. "(set %s=1 to skip them explicitly)", tostring(srv), M.SKIP_VAR)
		error(shared_err, 0)
	end
	shared = srv
	return srv
end

-- For setUp: the shared server, or a luaunit skip when the developer asked for one or the core
-- was built without PostgreSQL support.
function M.require_server(lu)
	if require("offline_store.core").postgres == false then
		lu.skip("offline_store.core was built without PostgreSQL support (make POSTGRES=no): postgres specs skipped")
	end
	local srv = M.server()
	if not srv then lu.skip(M.SKIP_VAR .. "=1: PostgreSQL specs skipped on request") end
	return srv
end

-- Safety net, as in support.prosody: finalizers run on state close; os.exit is wrapped.
M._sentinel = setmetatable({}, { __gc = function() M.cleanup_all() end })
do
	local real_exit = os.exit
	os.exit = function(...) -- luacheck: ignore 122
		M.cleanup_all()
		return real_exit(...)
	end
end

return M
