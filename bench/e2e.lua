-- bench/e2e.lua: end-to-end benchmark of offline storage inside a real Prosody 0.12,
-- driven over XMPP, against Prosody's own mod_offline, in one run on one machine.
--
--   make bench-e2e                       the comparison (N=20000, 5 rounds, medians)
--   lua5.4 bench/e2e.lua                 the same
--   lua5.4 bench/e2e.lua --quick         N=2000, R=20, one run (unless --runs), every variant (< 1 min)
--   lua5.4 bench/e2e.lua --paired-scale --scale-variants stub,ours --pop-users 200 --runs 3
--                                        the scale run (below)
--   make bench-e2e-postgres              ours on PostgreSQL against ours on sqlite and the bundled
--                                        module on mod_storage_sql/PostgreSQL, one and two nodes
--   lua5.4 bench/e2e.lua --variants ours,ours@/work/other --baseline ours --runs 5
--                                        two checkouts compared in one run
--
-- Options: -N messages, -R recipients, -B body bytes, -S senders, -C concurrent logins,
--   --runs K (medians over K rounds), --variants a,b (of stub,internal,sql,ours,memory,pg,sqlpg,
--   and base@DIR for base ours, memory or pg), --nodes 2 (every pg variant also runs as two
--   servers on its database: below), --baseline v (per-round ratios of every variant to v),
--   --pop-users U (only the first U recipients log in in the pop phase, the others keep
--   their messages), --no-scale (accepted for the commands of doc/performance.md: the
--   comparison is all that runs without --paired-scale).
-- --paired-scale: the scale run, N=1,000,000 to R=10,000 next to N. Per round and variant
--   of --scale-variants (default stub,ours), a server of N messages and one of 1,000,000
--   are both kept alive: the big one stores all but N, the small one its N, the big one its
--   last N (the store rate compared is of these two slices, seconds apart); then their pops
--   (U recipients each, --pop-users, default 200) run in alternating slices of C
--   recipients. So both sides of each ratio come from the same minutes of the machine.
--   The targets take the median of the per-round ratios; --runs K rounds (default 3).
-- Profiling and the other options of the lab this was are in the git history (before the
-- commit that trimmed this file).
--
-- The variants, each a fresh Prosody (spec/support/prosody.lua) with fresh data:
--   stub      the floor: modules_disabled = { "offline" }, mod_offline_stub accepts and drops
--   internal  Prosody's bundled mod_offline, storage = "internal"
--   sql       bundled mod_offline, its "offline" store on mod_storage_sql / SQLite3 (LuaDBI);
--             every other store (accounts, roster) stays internal in every variant, so the
--             variants differ in the offline store only
--   ours      lua/mod_offline.lua, sqlite backend, default durability (synchronous = normal)
--   memory    lua/mod_offline.lua, memory backend
--   pg        lua/mod_offline.lua, postgres backend (offline_backend = "postgres"), a fresh
--             schema of the run's PostgreSQL
--   sqlpg     bundled mod_offline, its "offline" store on mod_storage_sql / PostgreSQL (LuaDBI),
--             a fresh database of the run's PostgreSQL
--   ours@DIR, memory@DIR, pg@DIR
--             the same, with the plugin and the core of another checkout DIR (DIR/lua and
--             DIR/build/offline_store/core.so, built there): two commits in one run, each
--             round running a variant and its @DIR twins back to back
-- The run's PostgreSQL (pg, sqlpg) is one private cluster (spec/support/postgres.lua) on
-- loopback with PostgreSQL's production durability (fsync, full_page_writes and
-- synchronous_commit on), started once, checkpointed before each variant; its CPU (the
-- postmaster and every backend, reaped ones included) is measured with the server's.
-- --nodes 2: each pg variant also runs as two Prosody servers with the same host name on
-- one schema (offline_node bench1 and bench2), sender s and recipient r on node
-- (s - 1) % 2 + 1 and (r - 1) % 2 + 1: both nodes store at once. Its server CPU, RSS and
-- throughput are those of both together; it runs right after its one-node variant.
-- Ours runs with access = { max_user_offline_messages = { { acl = "all", value = "infinity" } } }
-- (printed with the parameters); the bundled archives keep storage_archive_item_limit = 10000.
--
-- The load: S senders log in (SASL PLAIN, no TLS, loopback), then each pipelines its share
-- of N chat messages (B-byte bodies, unique ids "<sender>-<seq>") and a final ping; sender
-- s's k-th message goes to recipient k mod R, so every recipient gets N/R messages from
-- every sender. The store phase ends when every sender's ping is answered (a stream is
-- handled in order). Then the R recipients log in, at most C at a time, each sending
-- initial presence and a ping in one write; a recipient is done when its ping is
-- answered (delivery happens inside the presence handler, before the ping), and is then
-- checked and disconnected. A recipient is done when its ping is answered and it has every
-- message it should get (delivery may go on after the presence handler returns), or 5 s
-- after the ping's answer without a new message (the rest count as lost). The pop phase
-- is the time from the first login (its TCP connect) to the last message received, across
-- recipients (to the last ping's answer for the floor, which delivers nothing).
-- Checks: lost, duplicated, out of order (per sender), missing delay, misrouted, and error
-- stanzas received; with a database (pg, sqlpg), after the store phase, the rows stored
-- against the messages sent (`rows`: |stored - sent|) and, for ours, the users whose
-- queue count (what the limits read) differs from their rows (`count`); all must be 0.
--
-- Rounds: --runs K runs every variant K times, a round at a time, the floor and ours back to
-- back, every other round in the reverse order; the targets on ours/floor store CPU and
-- ours/internal pop CPU take the median of the per-round ratios (printed, with the ratio
-- of the medians), as do the ratios to --baseline and the PostgreSQL targets.
-- Measured per phase: wall seconds, messages/s, server CPU seconds per 1000 messages
-- (utime+stime of the prosody process from /proc/<pid>/stat), server RSS (VmRSS) at the
-- end of the phase, the generator's own CPU; after the store phase, bytes on disk under
-- data_path (accounts excluded) per stored message, and that over the stanza bytes (the
-- stored stanza as delivered, without the delay, measured in the pop phase).

local function script_dir()
	local src = debug.getinfo(1, "S").source:sub(2)
	return src:match("^(.*)/[^/]*$") or "."
end
local ROOT = assert(io.popen("cd '" .. script_dir() .. "/..' && pwd")):read("l")
package.path = ROOT .. "/spec/?.lua;" .. package.path

local server = require "support.prosody"
local socket = require "socket"
local b64 = require "mime".b64

local find, sub, match, byte, format, rep = string.find, string.sub, string.match, string.byte, string.format, string.rep
local concat, sort = table.concat, table.sort
local gettime, select_ = socket.gettime, socket.select
local floor, huge = math.floor, math.huge

local START = gettime()
local function log(fmt, ...)
	io.stderr:write(("[%7.1fs] "):format(gettime() - START) .. fmt:format(...) .. "\n")
	io.stderr:flush()
end

---------------------------------------------------------------------------------------------------
-- Options

local opt = {
	N = 20000, R = 200, B = 100, S = 4, C = 20, runs = 5,
	variants = { "stub", "internal", "sql", "ours", "memory" },
	nodes = 1,
	scale_N = 1000000, scale_R = 10000,
	scale_variants = { "stub", "ours" },
}
local function split(s) local t = {} for w in s:gmatch("[^,%s]+") do t[#t + 1] = w end return t end
do
	local i, quick, runs_given = 1, false, false
	local function val() i = i + 1; return (assert(arg[i], "missing value after " .. arg[i - 1])) end
	local function num() local v = tonumber(val()); assert(v and v >= 0 and v == floor(v), "bad number"); return floor(v) end
	while arg[i] do
		local a = arg[i]
		if a == "-N" then opt.N = num()
		elseif a == "-R" then opt.R = num()
		elseif a == "-B" then opt.B = num()
		elseif a == "-S" then opt.S = num()
		elseif a == "-C" then opt.C = num()
		elseif a == "--runs" then opt.runs = num(); runs_given = true
		elseif a == "--variants" then opt.variants = split(val())
		elseif a == "--nodes" then opt.nodes = num()
		elseif a == "--baseline" then opt.baseline = val()
		elseif a == "--scale-variants" then opt.scale_variants = split(val())
		elseif a == "--no-scale" then opt.paired_scale = false -- (the default)
		elseif a == "--pop-users" then opt.pop_users = num()
		elseif a == "--paired-scale" then opt.paired_scale = true
		elseif a == "--quick" then quick = true
		else
			io.stderr:write("usage: lua5.4 bench/e2e.lua [--quick] [-N n] [-R n] [-B n] [-S n] [-C n] [--runs k]"
				.. " [--variants a,b] [--nodes 2] [--baseline v] [--paired-scale] [--scale-variants a,b] [--pop-users u]\n")
			os.exit(2)
		end
		i = i + 1
	end
	if quick then
		opt.N, opt.R = math.min(opt.N, 2000), math.min(opt.R, 20)
		if not runs_given then opt.runs = 1 end
	end
	if opt.paired_scale then
		opt.pop_users = opt.pop_users or 200
		if not runs_given then opt.runs = 3 end
	end
	assert(opt.S >= 1 and opt.R >= 1 and opt.C >= 1 and opt.runs >= 1, "S, R, C and runs must be >= 1")
	assert(opt.nodes == 1 or opt.nodes == 2, "--nodes: 1 or 2")
	assert(opt.nodes == 1 or not opt.paired_scale, "--nodes 2 is for the comparison, not --paired-scale")
end

---------------------------------------------------------------------------------------------------
-- Variants

local LIMIT_RULE = 'access = { max_user_offline_messages = { { acl = "all", value = "infinity" } } }'

-- global and host: config lines, or functions of the variant's database (db_prepare) and
-- node number that return them. db: "ours" (our postgres tables) or "sql" (mod_storage_sql's).
local function pg_host(d, node)
	return format('offline_backend = "postgres"\noffline_postgres = %q\noffline_node = "bench%d"\n%s',
		d.conninfo, node, LIMIT_RULE)
end
local VARIANTS = {
	stub = { label = "floor: mod_offline_stub", drops = true,
		plugin_paths = { ROOT .. "/lua" }, modules_enabled = { "offline_stub" }, modules_disabled = { "offline" } },
	internal = { label = "bundled, internal", global = 'storage = "internal"' },
	sql = { label = "bundled, sql (SQLite3)", global =
		'storage = { offline = "sql" }\nsql = { driver = "SQLite3", database = "prosody.sqlite" }' },
	ours = { label = "ours, sqlite", plugin_paths = { ROOT .. "/lua" },
		host = 'offline_backend = "sqlite"\n' .. LIMIT_RULE },
	memory = { label = "ours, memory", plugin_paths = { ROOT .. "/lua" },
		host = 'offline_backend = "memory"\n' .. LIMIT_RULE },
	pg = { label = "ours, postgres", plugin_paths = { ROOT .. "/lua" }, db = "ours", host = pg_host },
	sqlpg = { label = "bundled, sql (PostgreSQL)", db = "sql", global = function(d)
		return format('storage = { offline = "sql" }\nsql = { driver = "PostgreSQL", database = %q,'
			.. ' host = "127.0.0.1", port = %d, username = "postgres" }', d.database, d.port)
	end },
}
local ORDER = { "stub", "internal", "sql", "ours", "memory", "pg", "sqlpg" }
-- The order a round runs them in: the floor and ours back to back, then bundled/internal,
-- so that the per-round ratios the targets take are between runs seconds apart (this
-- machine's speed drifts over minutes); every other round runs it backwards. A variant's
-- twins (base@DIR, two nodes) run right after it.
local RUN_ORDER = { "stub", "ours", "pg", "sqlpg", "internal", "memory", "sql" }

local function shell_out(cmd)
	local p = assert(io.popen(cmd .. " 2>/dev/null"))
	local out = p:read("a")
	p:close()
	return (out:gsub("%s+$", ""))
end

-- "ours@DIR", "memory@DIR", "pg@DIR": the variant with DIR's plugin and core.
local function define_checkout_variant(v)
	local base, dir = v:match("^(%w+)@(.+)$")
	if not (base == "ours" or base == "memory" or base == "pg") then return end
	dir = shell_out("cd '" .. dir .. "' && pwd")
	local lib = dir .. "/build/offline_store/core.so"
	assert(io.open(dir .. "/lua/mod_offline.lua"), v .. ": no lua/mod_offline.lua in " .. dir)
	assert(io.open(lib), v .. ": no " .. lib .. " (run make there)")
	local V = {}
	for k, x in pairs(VARIANTS[base]) do V[k] = x end
	local commit = shell_out("git -C '" .. dir .. "' rev-parse --short HEAD")
	local at = commit ~= "" and commit or dir:match("[^/]*$")
	V.base, V.plugin_paths, V.short = base, { dir .. "/lua" }, base .. "@" .. at
	V.label = V.label .. " @" .. at
	V.host_extra = format("offline_library_path = %q", lib)
	VARIANTS[v] = V
end

-- Adds, after each pg variant of list, its two-node twin "<v>*2".
local function add_node_twins(list)
	local out = {}
	for _, v in ipairs(list) do
		out[#out + 1] = v
		local V = VARIANTS[v]
		if opt.nodes > 1 and V.db == "ours" and not V.nodes then
			local twin = {}
			for k, x in pairs(V) do twin[k] = x end
			twin.base, twin.nodes, twin.label = v, opt.nodes, V.label .. ", " .. opt.nodes .. " nodes"
			twin.short = (V.short or v) .. "*" .. opt.nodes
			VARIANTS[v .. "*" .. opt.nodes] = twin
			out[#out + 1] = v .. "*" .. opt.nodes
		end
	end
	return out
end

for _, list in ipairs { opt.variants, opt.scale_variants } do
	for _, v in ipairs(list) do
		if not VARIANTS[v] then define_checkout_variant(v) end
		assert(VARIANTS[v], "unknown variant " .. v .. " (stub, internal, sql, ours, memory, pg, sqlpg,"
			.. " ours@DIR, memory@DIR, pg@DIR)")
	end
end
do
	local n = #opt.variants
	opt.variants = add_node_twins(opt.variants)
	assert(opt.nodes == 1 or #opt.variants > n, "--nodes 2 needs a pg variant (pg, pg@DIR)")
	local listed = false
	for _, v in ipairs(opt.variants) do listed = listed or v == opt.baseline end
	assert(opt.baseline == nil or listed, "--baseline must be one of --variants")
end
---------------------------------------------------------------------------------------------------
-- /proc

local read_file = require "support.util".read

local CLK_TCK = tonumber(assert(io.popen("getconf CLK_TCK")):read("l")) or 100

-- utime + stime of pid, in seconds (and each); with `reaped`, plus those of its children
-- that have exited and been waited for (cutime + cstime). nil for a process that is gone.
local function proc_cpu(pid, reaped)
	local stat = read_file("/proc/" .. pid .. "/stat")
	if not stat then return nil end
	local rest = stat:match("%) (.*)$")
	local f = {}
	for w in rest:gmatch("%S+") do f[#f + 1] = w end
	-- fields after the comm: state(3) ... utime(14) stime(15) cutime(16) cstime(17) -> indexes 12 to 15
	local u, k = tonumber(f[12]) / CLK_TCK, tonumber(f[13]) / CLK_TCK
	if reaped then u, k = u + tonumber(f[14]) / CLK_TCK, k + tonumber(f[15]) / CLK_TCK end
	return u + k, u, k
end

-- The CPU of the servers (pids), summed.
local function servers_cpu(pids)
	local c, u, k = 0, 0, 0
	for _, pid in ipairs(pids) do
		local c1, u1, k1 = proc_cpu(pid)
		assert(c1, "no such process " .. pid)
		c, u, k = c + c1, u + u1, k + k1
	end
	return c, u, k
end

-- The CPU of a PostgreSQL cluster: its postmaster with its reaped children, and its live
-- children (backends, autovacuum, checkpointer, ...).
local function cluster_cpu(postmaster)
	local total = assert(proc_cpu(postmaster, true), "the PostgreSQL postmaster is gone")
	local children = read_file(format("/proc/%d/task/%d/children", postmaster, postmaster)) or ""
	for child in children:gmatch("%d+") do total = total + (proc_cpu(child) or 0) end
	return total
end

-- VmRSS and VmHWM of the servers, summed, in MB.
local function proc_rss_mb(pids)
	local rss, hwm = 0, 0
	for _, pid in ipairs(pids) do
		local status = read_file("/proc/" .. pid .. "/status") or ""
		rss = rss + (tonumber(status:match("VmRSS:%s*(%d+)")) or 0) / 1024
		hwm = hwm + (tonumber(status:match("VmHWM:%s*(%d+)")) or 0) / 1024
	end
	return rss, hwm
end

local function self_cpu() return os.clock() end

-- Bytes of every file under dir, except the accounts.
local function disk_bytes(dir)
	local p = assert(io.popen(format("find '%s' -type f -not -path '*/accounts/*' -printf '%%s\\n'", dir)))
	local total = 0
	for line in p:lines() do total = total + (tonumber(line) or 0) end
	p:close()
	return total
end

---------------------------------------------------------------------------------------------------
-- The load generator: non-blocking LuaSocket connections over socket.select, and a lean
-- scanner for the server's output (Prosody serialises with single quotes and escapes
-- '<' and '>' in attribute values, so the first '>' ends a start tag; top-level elements
-- here never nest an element of their own name).

local HOST = "localhost"
local NS_STREAM = "http://etherx.jabber.org/streams"
local STREAM_OPEN = format("<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client'"
	.. " xmlns:stream='%s' version='1.0'>", HOST, NS_STREAM)
local PASSWORD = "pw"
local STALL = 600 -- seconds without any I/O progress before a phase is declared stuck
local POP_GRACE = 5 -- seconds a recipient waits for missing messages after its ping's answer

local function sender_name(s) return "s" .. s end
local function recipient_name(r) return "r" .. r end

local conns = {}   -- socket -> connection
local nconns = 0

local Conn = {}
Conn.__index = Conn

local function connect(port, user, handler)
	local sock = assert(socket.tcp())
	sock:settimeout(5)
	local ok, err = sock:connect("127.0.0.1", port)
	if not ok then error("connect: " .. tostring(err)) end
	sock:setoption("tcp-nodelay", true)
	sock:settimeout(0)
	local c = setmetatable({ sock = sock, user = user, buf = "", out = nil, outpos = 1,
		state = "features1", handler = handler }, Conn)
	conns[sock] = c
	nconns = nconns + 1
	c:send(STREAM_OPEN)
	return c
end

function Conn:send(data)
	if self.out then
		self.out = sub(self.out, self.outpos) .. data
	else
		self.out = data
	end
	self.outpos = 1
end

function Conn:close()
	if self.dead then return end
	self.dead = true
	self.sock:settimeout(0)
	self.sock:send("</stream:stream>")
	self.sock:close()
	conns[self.sock] = nil
	nconns = nconns - 1
end

-- Writes what it can; returns true on progress.
function Conn:flush()
	local last, err, partial = self.sock:send(self.out, self.outpos)
	if last then
		self.out, self.outpos = nil, 1
		if self.drained then self:drained() end
		return true
	end
	if err == "timeout" then
		local progress = partial >= self.outpos
		self.outpos = partial + 1
		return progress
	end
	error(format("%s: send failed: %s", self.user, tostring(err)))
end

local CLOSE_TAG = setmetatable({}, { __index = function(t, name)
	local v = "</" .. name .. ">"
	t[name] = v
	return v
end })

-- Feeds the complete top-level elements in the buffer to the connection's state machine.
function Conn:scan()
	local buf, pos = self.buf, 1
	while true do
		local s = find(buf, "<", pos, true)
		if not s then pos = #buf + 1; break end
		local gt = find(buf, ">", s, true)
		if not gt then pos = s; break end
		local b2 = byte(buf, s + 1)
		if b2 == 63 then -- <?xml ...?>
			pos = gt + 1
		elseif b2 == 47 then -- </stream:stream>
			self.server_closed = true
			pos = gt + 1
		else
			local name = match(buf, "^<([^%s/>]+)", s)
			if name == "stream:stream" then
				pos = gt + 1
			else
				local e
				if byte(buf, gt - 1) == 47 then
					e = gt
				else
					local _, ee = find(buf, CLOSE_TAG[name], gt + 1, true)
					if not ee then pos = s; break end
					e = ee
				end
				self:element(name, buf, s, gt, e)
				pos = e + 1
				if self.dead then return end
			end
		end
	end
	self.buf = pos > #buf and "" or sub(buf, pos)
end

function Conn:read()
	local data, err, partial = self.sock:receive(65536)
	data = data or partial
	local progress = false
	if data and #data > 0 then
		progress = true
		self.buf = self.buf == "" and data or self.buf .. data
		self:scan()
	end
	if err == "closed" and not self.dead then
		error(format("%s: connection closed by the server (state %s)", self.user, self.state))
	end
	return progress
end

-- Login state machine; then hands elements to the role's handler.
function Conn:element(name, buf, s, gt, e)
	local state = self.state
	if name == "stream:error" then
		error(format("%s: stream error: %s", self.user, sub(buf, s, e)))
	elseif state == "features1" then
		if name == "stream:features" then
			self:send(format("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>%s</auth>",
				b64("\0" .. self.user .. "\0" .. PASSWORD)))
			self.state = "auth"
		end
	elseif state == "auth" then
		if name == "success" then
			self:send(STREAM_OPEN)
			self.state = "features2"
		elseif name == "failure" then
			error(format("%s: SASL failure: %s", self.user, sub(buf, s, e)))
		end
	elseif state == "features2" then
		if name == "stream:features" then
			self:send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
				.. "<resource>bench</resource></bind></iq>")
			self.state = "bind"
		end
	elseif state == "bind" then
		if name == "iq" and find(sub(buf, s, gt), "id='bind'", 1, true) then
			if not find(sub(buf, s, gt), "type='result'", 1, true) then
				error(format("%s: bind failed: %s", self.user, sub(buf, s, e)))
			end
			self.state = "ready"
			self.handler.ready(self)
		end
	else
		self.handler.element(self, name, buf, s, gt, e)
	end
end

-- Runs the loop until done() is true. Raises when no I/O progress happens for STALL seconds.
local function run_until(done)
	local last_progress = gettime()
	local rl, wl = {}, {}
	while not done() do
		local nr, nw = 0, 0
		for sock, c in pairs(conns) do
			nr = nr + 1; rl[nr] = sock
			if c.out then nw = nw + 1; wl[nw] = sock end
		end
		for i = nr + 1, #rl do rl[i] = nil end
		for i = nw + 1, #wl do wl[i] = nil end
		if nr == 0 then error("no connection left and the phase is not done") end
		local r, w = select_(rl, wl, 1)
		local progress = false
		for _, sock in ipairs(w) do
			local c = conns[sock]
			if c and c.out and c:flush() then progress = true end
		end
		for _, sock in ipairs(r) do
			local c = conns[sock]
			if c and c:read() then progress = true end
		end
		local now = gettime()
		if progress then
			last_progress = now
		elseif now - last_progress > STALL then
			error(format("no progress for %d s", STALL))
		end
	end
end

---------------------------------------------------------------------------------------------------
-- One variant, one set of parameters: a fresh server, the two phases, the checks.

local function count_for(M_s, R, r0)
	-- how many k in [0, M_s) with k % R == r0
	if r0 >= M_s then return 0 end
	return (M_s - 1 - r0) // R + 1
end

local function write_accounts(dir, names)
	local adir = dir .. "/data/" .. HOST .. "/accounts"
	assert(os.execute("mkdir -p '" .. adir .. "'"))
	local body = format("return {\n\t[\"password\"] = %q;\n};\n", PASSWORD)
	for _, name in ipairs(names) do
		local f = assert(io.open(adir .. "/" .. name .. ".dat", "wb"))
		f:write(body)
		f:close()
	end
end

-- The run's PostgreSQL, started on first use with production durability; per variant a
-- fresh schema (ours) or database (mod_storage_sql), dropped when the variant is done.
local pg_cluster
local function pg_server()
	if not pg_cluster then
		pg_cluster = require "support.postgres".start { durable = true }
		local pm = read_file(pg_cluster.data .. "/postmaster.pid") or ""
		pg_cluster.postmaster = assert(tonumber(pm:match("^(%d+)")), "no postmaster.pid")
		log("PostgreSQL %s on port %d (fsync %s, synchronous_commit %s)", pg_cluster:psql("SHOW server_version"),
			pg_cluster.port, pg_cluster:psql("SHOW fsync"), pg_cluster:psql("SHOW synchronous_commit"))
	end
	return pg_cluster
end

-- What a variant with a database needs: the config's values (conninfo, or database and
-- port), the queries of the store checks and how to drop it.
local function db_prepare(V)
	local pg = pg_server()
	pg:psql("CHECKPOINT") -- the previous variant's dirty pages are not this one's cost
	local d = { pg = pg, port = pg.port }
	if V.db == "ours" then
		local schema
		d.conninfo, schema = pg:fresh_conninfo()
		d.rows = format("SELECT count(*) FROM %s.offline_message", schema)
		d.counts = format("SELECT count(*) FROM %s.offline_queue q WHERE q.count <> (SELECT count(*)"
			.. " FROM %s.offline_message m WHERE m.host = q.host AND m.username = q.username)", schema, schema)
		d.drop = function() pg:psql("DROP SCHEMA " .. schema .. " CASCADE") end
	else
		d.database = pg:fresh_database()
		d.rows = "SELECT count(*) FROM prosodyarchive WHERE store = 'offline'"
		d.drop = function() pg:psql("DROP DATABASE " .. d.database, "postgres") end
	end
	return d
end

-- One measured phase: start() sets the load going, the phase lasts until done();
-- adds to res.<phase>_wall, _cpu, _utime, _stime, _gen (the generator's CPU) and _dbcpu
-- (the PostgreSQL cluster's), so a phase may be measured in slices; sets _rss and _hwm.
-- The wall time ends at ended_at() when given (the time the phase's work was seen done),
-- else when done() turned true.
local function measure_phase(res, phase, ctx, start, done, ended_at)
	local pm = ctx.db and ctx.db.pg.postmaster
	local cpu0, u0, k0 = servers_cpu(ctx.pids)
	local db0 = pm and cluster_cpu(pm)
	local gen0, t0 = self_cpu(), gettime()
	start()
	run_until(done)
	local t1 = ended_at and ended_at() or gettime()
	local cpu1, u1, k1 = servers_cpu(ctx.pids)
	local gen1 = self_cpu()
	local function add(k, v) if v then res[phase .. k] = (res[phase .. k] or 0) + v end end
	add("_utime", u1 - u0)
	add("_stime", k1 - k0)
	add("_wall", t1 - t0)
	add("_cpu", cpu1 - cpu0)
	add("_gen", gen1 - gen0)
	add("_dbcpu", pm and cluster_cpu(pm) - db0)
	res[phase .. "_rss"], res[phase .. "_hwm"] = proc_rss_mb(ctx.pids)
end

-- A variant's run in steps, so that two servers can be alive at once (the paired scale
-- run interleaves their phases): start_variant (a fresh server, or the variant's nodes,
-- its senders logged in), store_upto (the store phase, at once or in slices), pop_range
-- (recipients first..last log in, C at a time; at once or in slices: the figures add up),
-- finish_variant (the server's logged errors; stops the server). run_variant does them all.
local function stop_variant(ctx)
	for _, c in ipairs(ctx.conns) do pcall(c.close, c) end
	ctx.conns = {}
	for i, srv in ipairs(ctx.srvs) do
		srv:cleanup()
		os.remove(ctx.logfiles[i])
	end
	if ctx.db then ctx.db.drop() end
end

-- Connects user to node (1-based) of the variant.
local function ctx_connect(ctx, user, handler, node)
	local c = connect(ctx.srvs[node].c2s_port, user, handler)
	ctx.conns[#ctx.conns + 1] = c
	return c
end

-- The node a sender or recipient (1-based) connects to.
local function node_of(ctx, i) return (i - 1) % #ctx.srvs + 1 end

-- The store phase's senders: accounts written, S senders logged in (not measured).
local function store_connect(ctx)
	local P, res = ctx.P, ctx.res
	local R, S = P.R, P.S
	local names = {}
	for s = 1, S do names[#names + 1] = sender_name(s) end
	for r = 1, R do names[#names + 1] = recipient_name(r) end
	for _, srv in ipairs(ctx.srvs) do write_accounts(srv.dir, names) end
	local body = rep("x", P.B)
	local BATCH = 256
	local st = { ready = 0, done = 0, sent_bytes = 0, senders = {} }
	ctx.store = st
	local sender_handler = {}
	function sender_handler.ready()
		st.ready = st.ready + 1
	end
	function sender_handler.element(c, name, buf, s, gt, e)
		local tag = sub(buf, s, gt)
		if name == "iq" and find(tag, "id='end'", 1, true) then
			st.done = st.done + 1
		elseif find(tag, "type='error'", 1, true) then
			res.errors = res.errors + 1
			if res.errors <= 3 then log("%s: error stanza: %s", c.user, sub(buf, s, math.min(e, s + 400))) end
		end
	end
	-- pipelines the sender's messages up to its limit, then its ping
	function st.drained(c)
		local k0 = c.next_k
		if k0 >= c.limit then
			if not c.pinged then
				c.pinged = true
				c:send("<iq type='get' id='end' to='" .. HOST .. "'><ping xmlns='urn:xmpp:ping'/></iq>")
			end
			return
		end
		local parts, n = {}, 0
		local k1 = math.min(c.limit, k0 + BATCH) - 1
		for k = k0, k1 do
			n = n + 1
			parts[n] = format("<message to='r%d@%s' id='%d-%d' type='chat'><body>%s</body></message>",
				k % R + 1, HOST, c.index, k, body)
		end
		c.next_k = k1 + 1
		local data = concat(parts)
		st.sent_bytes = st.sent_bytes + #data
		c:send(data)
	end
	for s = 1, S do
		local c = ctx_connect(ctx, sender_name(s), sender_handler, node_of(ctx, s))
		c.index, c.total, c.next_k = s - 1, ctx.M[s], 0
		st.senders[s] = c
	end
	run_until(function() return st.ready == S end)
end

-- Stores messages until `upto` of the N have been sent (every sender its share) and
-- handled: one measured slice of the store phase (adds to res.store_*; the last slice,
-- upto = N, also fills res.last_*). Called once with N, or over increasing slices.
local function store_upto(ctx, upto)
	local vname, P, res, st = ctx.vname, ctx.P, ctx.res, ctx.store
	local N, S = P.N, P.S
	local n0 = res.stored or 0
	st.done = 0
	local cpu0, wall0 = res.store_cpu or 0, res.store_wall or 0
	measure_phase(res, "store", ctx, function()
		for s, c in ipairs(st.senders) do
			c.limit = upto >= N and ctx.M[s] or ctx.M[s] * upto // N
			c.pinged = false
			c.drained = st.drained
			st.drained(c)
		end
	end, function() return st.done == S end)
	local stored = 0
	for _, c in ipairs(st.senders) do stored = stored + c.next_k end
	res.stored = stored
	if stored < N then return end
	-- the phase is over
	res.last_n, res.last_wall, res.last_cpu = stored - n0, res.store_wall - wall0, res.store_cpu - cpu0
	res.sent_stanza_bytes = st.sent_bytes / math.max(N, 1)
	for _, c in ipairs(st.senders) do c:close() end
	local d = ctx.db
	if d then
		-- the data is in PostgreSQL (its size on disk is not measured); the checks of what it holds
		local rows = tonumber(d.pg:psql(d.rows, d.database))
		res.rows = math.abs(rows - (ctx.V.drops and 0 or N))
		res.counts = d.counts and tonumber(d.pg:psql(d.counts)) or 0
		if res.rows + res.counts > 0 then
			log("  %s: %d rows stored for %d messages sent; %d queue counts differ from their rows", vname, rows, N, res.counts)
		end
	else
		res.disk = disk_bytes(ctx.srvs[1].dir .. "/data")
	end
	log("  %-8s store: %d msgs in %.2f s, server CPU %.2f s (user %.2f, sys %.2f), generator CPU %.2f s%s",
		vname, N, res.store_wall, res.store_cpu, res.store_utime, res.store_stime, res.store_gen,
		res.store_dbcpu and format(", PostgreSQL CPU %.2f s", res.store_dbcpu) or "")
end

-- A config entry of a variant: text, or a function of its database and node number.
local function config_text(x, d, node)
	if type(x) == "function" then return x(d, node) end
	return x or ""
end

local function start_variant(vname, P)
	local V = VARIANTS[vname]
	local N, R, S = P.N, P.R, P.S
	local plugin_paths, modules_enabled = {}, {}
	for _, p in ipairs(V.plugin_paths or {}) do plugin_paths[#plugin_paths + 1] = p end
	for _, m in ipairs(V.modules_enabled or {}) do modules_enabled[#modules_enabled + 1] = m end
	-- Messages per sender.
	local M = {}
	for s = 1, S do M[s] = N // S + ((s - 1) < N % S and 1 or 0) end
	local U = math.min(opt.pop_users or R, R) -- recipients that log in in the pop phase
	local ctx = { vname = vname, V = V, P = P, U = U, M = M,
		srvs = {}, pids = {}, logfiles = {}, conns = {},
		res = { variant = vname, N = N, R = R, B = P.B, S = S, C = P.C, U = U,
			lost = 0, dup = 0, order = 0, nodelay = 0, misrouted = 0, errors = 0,
			received = 0, pop_stanza_bytes = 0 } }
	local ok, err = pcall(function()
		ctx.db = V.db and db_prepare(V)
		for node = 1, V.nodes or 1 do
			local logfile = os.tmpname()
			ctx.logfiles[node] = logfile
			local srv = server.start {
				plugin_paths = plugin_paths, modules_enabled = modules_enabled, modules_disabled = V.modules_disabled,
				global = concat({ "log = { info = ENV_E2E_LOG; error = ENV_E2E_LOG }",
					"c2s_stanza_size_limit = 1024 * 1024", config_text(V.global, ctx.db, node) }, "\n"),
				host = config_text(V.host, ctx.db, node) .. "\n" .. (V.host_extra or ""),
				env = { E2E_LOG = logfile },
			}
			ctx.srvs[node] = srv
			ctx.pids[node] = assert(srv:pid(), "no prosody pid")
		end
		store_connect(ctx)
	end)
	if not ok then
		stop_variant(ctx)
		error(format("variant %s failed: %s", vname, tostring(err)), 0)
	end
	return ctx
end

-- The pop phase for recipients first..last (1-based), C at a time; adds to ctx.res.
local function pop_range(ctx, first, last)
	local V, P, res = ctx.V, ctx.P, ctx.res
	local R, S, C, M = P.R, P.S, P.C, ctx.M
	local n = last - first + 1
	local next_r, active, finished = first, 0, 0
	local received, stanza_bytes = 0, 0
	local waiting = {} -- recipients whose ping was answered before all their messages came
	local ended = 0 -- the time the last recipient had all its messages
	local recipient_handler = {}
	local start_recipient
	function recipient_handler.ready(c)
		c:send("<presence/><iq type='get' id='end' to='" .. HOST .. "'><ping xmlns='urn:xmpp:ping'/></iq>")
	end
	local function finish(c)
		-- checks for this recipient
		if c.unique < c.expected then res.lost = res.lost + (c.expected - c.unique) end
		ended = math.max(ended, c.complete_at or c.last_at or c.ponged)
		c.seen, c.last = nil, nil -- (ctx.conns keeps the connection until the server stops)
		waiting[c] = nil
		finished = finished + 1
		active = active - 1
		c:close()
		start_recipient()
	end
	-- Done when all its messages came and its ping was answered, or POP_GRACE seconds
	-- after both its ping's answer and its last message.
	local function check(c, now)
		if not c.ponged then return end
		if c.unique >= c.expected or now - math.max(c.ponged, c.last_at or 0) > POP_GRACE then
			finish(c)
		else
			waiting[c] = true
		end
	end
	local function done()
		if next(waiting) then
			local now = gettime()
			for c in pairs(waiting) do check(c, now) end
		end
		return finished == n
	end
	function recipient_handler.element(c, name, buf, s, gt, e)
		if name == "message" then
			local tag = sub(buf, s, gt)
			if find(tag, "type='error'", 1, true) then
				res.errors = res.errors + 1
				if res.errors <= 3 then log("%s: error stanza: %s", c.user, sub(buf, s, math.min(e, s + 400))) end
				return
			end
			received = received + 1
			local id = match(tag, " id='([^']*)'")
			local si, k = match(id or "", "^(%d+)-(%d+)$")
			si, k = tonumber(si), tonumber(k)
			if not si or si >= S or k % R ~= c.r0 then
				res.misrouted = res.misrouted + 1
			elseif c.seen[id] then
				res.dup = res.dup + 1
			else
				c.seen[id] = true
				c.unique = c.unique + 1
				c.last_at = gettime()
				if c.unique == c.expected then c.complete_at = c.last_at end
				local last_k = c.last[si]
				if last_k and k < last_k then res.order = res.order + 1 end
				c.last[si] = k
			end
			local d = find(buf, "<delay", gt, true)
			local size = e - s + 1
			if d and d < e then
				local dgt = find(buf, ">", d, true)
				if find(sub(buf, d, dgt), "urn:xmpp:delay", 1, true) then
					local _, de = find(buf, "</delay>", d, true)
					if byte(buf, dgt - 1) == 47 then de = dgt end
					size = size - (de - d + 1)
				else
					res.nodelay = res.nodelay + 1
				end
			else
				res.nodelay = res.nodelay + 1
			end
			stanza_bytes = stanza_bytes + size
			if c.ponged and c.unique >= c.expected then finish(c) end
		elseif name == "iq" then
			if find(sub(buf, s, gt), "id='end'", 1, true) then
				c.ponged = gettime()
				if c.expected == 0 then c.complete_at = c.ponged end
				check(c, c.ponged)
			end
		end
	end
	function start_recipient()
		while active < C and next_r <= last do
			local r = next_r
			next_r = next_r + 1
			active = active + 1
			local c = ctx_connect(ctx, recipient_name(r), recipient_handler, node_of(ctx, r))
			c.r0, c.seen, c.last, c.unique, c.expected = r - 1, {}, {}, 0, 0
			if not V.drops then
				for s = 1, S do c.expected = c.expected + count_for(M[s], R, c.r0) end
			end
		end
	end

	measure_phase(res, "pop", ctx, start_recipient, done, function() return ended end)
	res.received = res.received + received
	res.pop_stanza_bytes = res.pop_stanza_bytes + stanza_bytes
	res.stanza_bytes = res.received > 0 and res.pop_stanza_bytes / res.received or nil
end

-- The errors the server logged; stops it; returns the result.
local function finish_variant(ctx)
	local res = ctx.res
	log("  %-8s pop:   %d msgs to %d users in %.2f s, server CPU %.2f s (user %.2f, sys %.2f), generator CPU %.2f s%s",
		ctx.vname, res.received, res.U, res.pop_wall, res.pop_cpu, res.pop_utime, res.pop_stime, res.pop_gen,
		res.pop_dbcpu and format(", PostgreSQL CPU %.2f s", res.pop_dbcpu) or "")
	local nerr = 0
	for _, logfile in ipairs(ctx.logfiles) do
		for line in (read_file(logfile) or ""):gmatch("[^\n]+") do
			if line:find("\terror\t", 1, true) then
				nerr = nerr + 1
				if nerr <= 3 then log("  prosody error: %s", line:sub(1, 300)) end
			end
		end
	end
	res.log_errors = nerr
	stop_variant(ctx)
	return res
end

local function run_variant(vname, P)
	local ctx = start_variant(vname, P)
	local ok, err = pcall(function()
		store_upto(ctx, P.N)
		pop_range(ctx, 1, ctx.U)
	end)
	if not ok then
		stop_variant(ctx)
		error(format("variant %s failed: %s", vname, tostring(err)), 0)
	end
	return finish_variant(ctx)
end

---------------------------------------------------------------------------------------------------
-- Reporting

local function median(list)
	local t = {}
	for i, v in ipairs(list) do t[i] = v end
	sort(t)
	local n = #t
	if n == 0 then return nil end
	if n % 2 == 1 then return t[(n + 1) // 2] end
	return (t[n // 2] + t[n // 2 + 1]) / 2
end

-- Derived metrics of one result.
local function derive(r)
	local k = r.N / 1000
	local U = r.U or r.R
	local pk = k * U / r.R -- thousands of messages popped (every recipient has N/R)
	return {
		store_wall = r.store_wall,
		store_rate = r.N / r.store_wall,
		store_cpu_k = r.store_cpu / k,
		store_rss = r.store_rss,
		store_gen = r.store_gen / math.max(r.store_cpu, 1e-9),
		disk_msg = r.disk and r.disk / r.N,
		store_us = r.store_cpu / r.N * 1e6, -- server CPU µs per message
		store_db_us = r.store_dbcpu and r.store_dbcpu / r.N * 1e6, -- and PostgreSQL's
		store_all_us = (r.store_cpu + (r.store_dbcpu or 0)) / r.N * 1e6,
		pop_wall = r.pop_wall,
		pop_rate = pk * 1000 / r.pop_wall,
		pop_cpu_k = r.pop_cpu / pk,
		pop_us = r.pop_cpu / pk * 1e3,
		pop_db_us = r.pop_dbcpu and r.pop_dbcpu / pk * 1e3,
		pop_all_us = (r.pop_cpu + (r.pop_dbcpu or 0)) / pk * 1e3,
		pop_cpu_user = r.pop_cpu / U * 1000, -- ms per recipient
		pop_rss = r.pop_rss,
		pop_hwm = r.pop_hwm,
		pop_gen = r.pop_gen / math.max(r.pop_cpu, 1e-9),
		stanza_bytes = r.stanza_bytes,
	}
end

local METRICS = { "store_wall", "store_rate", "store_cpu_k", "store_rss", "store_gen", "disk_msg",
	"store_us", "store_db_us", "store_all_us",
	"pop_wall", "pop_rate", "pop_cpu_k", "pop_us", "pop_db_us", "pop_cpu_user", "pop_rss", "pop_hwm", "pop_gen",
	"stanza_bytes" }

local function summarise(results)
	-- results: list of raw results of one variant
	local out, lists = {}, {}
	for _, m in ipairs(METRICS) do lists[m] = {} end
	local checks = { lost = 0, dup = 0, order = 0, nodelay = 0, misrouted = 0, errors = 0, log_errors = 0,
		rows = 0, counts = 0 }
	for _, r in ipairs(results) do
		local d = derive(r)
		for _, m in ipairs(METRICS) do if d[m] then lists[m][#lists[m] + 1] = d[m] end end
		for c in pairs(checks) do checks[c] = checks[c] + (r[c] or 0) end
	end
	for _, m in ipairs(METRICS) do out[m] = median(lists[m]) end
	out.checks, out.runs = checks, #results
	out.spread = {}
	for _, m in ipairs { "store_cpu_k", "pop_cpu_k", "store_rate", "pop_rate" } do
		local l = lists[m]
		if #l > 1 and out[m] and out[m] > 0 then
			local lo, hi = huge, -huge
			for _, v in ipairs(l) do lo = math.min(lo, v); hi = math.max(hi, v) end
			out.spread[m] = (hi - lo) / 2 / out[m]
		end
	end
	return out
end

local function fmt_num(v, digits)
	if v == nil then return "-" end
	if digits then return format("%." .. digits .. "f", v) end
	if v >= 1000 then return format("%.0f", v) end
	if v >= 100 then return format("%.0f", v) end
	if v >= 10 then return format("%.1f", v) end
	return format("%.2f", v)
end

local function print_table(title, P, summaries, variants, stanza_ref)
	print()
	print(title)
	print(format("  N=%d messages, R=%d recipients (%d messages each), B=%d-byte bodies, S=%d senders, C=%d concurrent logins;"
		.. " medians of %d run(s)", P.N, P.R, P.N // P.R, P.B, P.S, P.C, P.runs))
	if opt.pop_users and opt.pop_users < P.R then
		print(format("  pop phase: the first %d of the %d recipients log in; the others keep their messages", opt.pop_users, P.R))
	end
	print("  ours: " .. LIMIT_RULE .. "; bundled: storage_archive_item_limit = 10000; Prosody log level info")
	print()
	local hdr = { "variant", "store s", "store msg/s", "CPU s/1k", "RSS MB", "disk B/msg", "disk/stanza",
		"pop s", "pop msg/s", "CPU s/1k", "ms/user", "RSS MB", "gen CPU %", "lost", "dup", "order", "nodelay", "err" }
	local widths = { 24, 8, 11, 9, 7, 10, 11, 7, 10, 9, 8, 7, 10, 5, 4, 6, 8, 4 }
	for _, v in ipairs(variants) do widths[1] = math.max(widths[1], #VARIANTS[v].label) end
	local function row(cells)
		local t = {}
		for i, c in ipairs(cells) do
			t[i] = i == 1 and format("%-" .. widths[i] .. "s", c) or format("%" .. widths[i] .. "s", c)
		end
		print("  " .. concat(t, " "))
	end
	row(hdr)
	for _, v in ipairs(variants) do
		local s = summaries[v]
		if s then
			local ch = s.checks
			local stanza = stanza_ref or s.stanza_bytes
			row { VARIANTS[v].label,
				fmt_num(s.store_wall), fmt_num(s.store_rate), fmt_num(s.store_cpu_k, 3), fmt_num(s.store_rss, 1),
				fmt_num(s.disk_msg, 0), stanza and s.disk_msg and fmt_num(s.disk_msg / stanza, 2) or "-",
				fmt_num(s.pop_wall), fmt_num(s.pop_rate), fmt_num(s.pop_cpu_k, 3), fmt_num(s.pop_cpu_user, 2),
				fmt_num(s.pop_rss, 1),
				format("%.0f/%.0f", 100 * s.store_gen, 100 * s.pop_gen),
				tostring(ch.lost), tostring(ch.dup), tostring(ch.order), tostring(ch.nodelay),
				tostring(ch.errors + ch.misrouted) }
		end
	end
	-- ratios
	local ours = summaries.ours
	if ours then
		print()
		local function ratio_row(label, other)
			if not other then return end
			local function r(m) return (ours[m] and other[m] and other[m] > 0) and format("%.2f", ours[m] / other[m]) or "-" end
			row { label, r("store_wall"), r("store_rate"), r("store_cpu_k"), r("store_rss"), r("disk_msg"), "",
				r("pop_wall"), r("pop_rate"), r("pop_cpu_k"), r("pop_cpu_user"), r("pop_rss"), "", "", "", "", "", "" }
		end
		ratio_row("ours/bundled-internal", summaries.internal)
		ratio_row("ours/bundled-sql", summaries.sql)
		ratio_row("ours/floor", summaries.stub)
		ratio_row("ours/memory", summaries.memory)
	end
	-- spreads
	local sp = {}
	for _, v in ipairs(variants) do
		local s = summaries[v]
		if s and next(s.spread) then
			sp[#sp + 1] = format("%s: store CPU ±%.0f%%, pop CPU ±%.0f%%, store msg/s ±%.0f%%", v,
				100 * (s.spread.store_cpu_k or 0), 100 * (s.spread.pop_cpu_k or 0), 100 * (s.spread.store_rate or 0))
		end
	end
	if #sp > 0 then print("  spread (half of max-min over median): " .. concat(sp, "; ")) end
	print("  CPU s/1k = server utime+stime per 1000 messages; ms/user = pop-phase server CPU per recipient"
		.. " (login included); gen CPU % = generator CPU / server CPU (store/pop); err = error stanzas + misrouted")
end

-- Runs `variants`, interleaved, `runs` times; returns summaries by variant.
-- The variants of list in the given order (ORDER, the tables' order, by default), any
-- others (ours@DIR, ...) after them in list's order; each followed by its twins (base@DIR,
-- two nodes) of the list.
local function ordered(list, order)
	local set, out = {}, {}
	for _, v in ipairs(list) do set[v] = true end
	local function take(v)
		if not set[v] then return end
		out[#out + 1] = v
		set[v] = nil
		for _, w in ipairs(list) do if VARIANTS[w].base == v then take(w) end end
	end
	for _, v in ipairs(order or ORDER) do take(v) end
	for _, v in ipairs(list) do take(v) end
	return out
end

-- The per-round ratios a/b of metric m (a round runs every variant once), in run order;
-- nil where no round has both sides.
local function round_ratios(raw, a, b, m)
	local list = {}
	for i = 1, math.min(#(raw[a] or {}), #(raw[b] or {})) do
		local x, y = derive(raw[a][i])[m], derive(raw[b][i])[m]
		if x and y and y > 0 then list[#list + 1] = x / y end
	end
	return #list > 0 and list or nil
end

-- The targets' per-round ratios: ours/floor store CPU and ours/internal pop CPU.
local function paired(raw)
	return { floor_store = round_ratios(raw, "ours", "stub", "store_cpu_k"),
		internal_pop = round_ratios(raw, "ours", "internal", "pop_cpu_k") }
end

-- "a, b, c (median m)" of a list of per-round ratios.
local function rounds_text(list)
	local t = {}
	for i, v in ipairs(list) do t[i] = format("%.2f", v) end
	return format("%s (median %.2f)", concat(t, ", "), median(list))
end

local function print_paired(pr)
	local out = {}
	for _, x in ipairs { { "ours/floor store CPU", pr.floor_store }, { "ours/internal pop CPU", pr.internal_pop } } do
		if x[2] then out[#out + 1] = x[1] .. " " .. rounds_text(x[2]) end
	end
	if #out > 0 then print("  per round: " .. concat(out, "; ")) end
end

-- The pairs compared round by round: every variant against --baseline, each twin
-- (base@DIR, two nodes) against its variant, and the pairs of the PostgreSQL targets.
local function comparisons(variants)
	local have, seen, out = {}, {}, {}
	for _, v in ipairs(variants) do have[v] = true end
	local function add(a, b)
		if b and have[a] and have[b] and a ~= b and not seen[a .. "/" .. b] then
			seen[a .. "/" .. b] = true
			out[#out + 1] = { a, b }
		end
	end
	for _, v in ipairs(variants) do
		add(v, opt.baseline)
		add(v, VARIANTS[v].base)
	end
	add("pg", "ours")
	add("pg", "sqlpg")
	return out
end

-- The short table (throughput, CPU per message with PostgreSQL's, the checks) and the
-- per-round ratios of comparisons(variants), when there is any.
local function print_compact(summaries, variants, raw)
	local pairs_ = comparisons(variants)
	local db = false
	for _, v in ipairs(variants) do db = db or VARIANTS[v].db ~= nil end
	if #pairs_ == 0 and not db then return end
	local widths = { 36, 12, 10, 10, 10, 10, 10, 5, 6, 5 }
	local function row(cells)
		local t = {}
		for i, c in ipairs(cells) do t[i] = format(i == 1 and "%-" .. widths[i] .. "s" or "%" .. widths[i] .. "s", c) end
		print("  " .. concat(t, " "))
	end
	print()
	print("  CPU in µs per message: Prosody's (all nodes), and PostgreSQL's (+PG: the cluster's processes)")
	row { "variant", "store msg/s", "pop msg/s", "store µs", "+PG µs", "pop µs", "+PG µs", "rows", "count", "lost" }
	for _, v in ipairs(variants) do
		local s = summaries[v]
		row { VARIANTS[v].label, fmt_num(s.store_rate), fmt_num(s.pop_rate), fmt_num(s.store_us), fmt_num(s.store_db_us),
			fmt_num(s.pop_us), fmt_num(s.pop_db_us), VARIANTS[v].db and tostring(s.checks.rows) or "-",
			VARIANTS[v].db == "ours" and tostring(s.checks.counts) or "-", tostring(s.checks.lost) }
	end
	if #pairs_ == 0 then return end
	print()
	print("  ratios, median of the per-round ratios [lowest-highest round]; CPU = Prosody + PostgreSQL per message")
	widths = { 36, 18, 18, 18, 18 }
	row { "", "store msg/s", "pop msg/s", "store CPU", "pop CPU" }
	local function cell(a, b, m)
		local list = round_ratios(raw, a, b, m)
		if not list then return "-" end
		local lo, hi = huge, -huge
		for _, x in ipairs(list) do lo, hi = math.min(lo, x), math.max(hi, x) end
		return #list > 1 and format("%.2f [%.2f-%.2f]", median(list), lo, hi) or format("%.2f", list[1])
	end
	for _, p in ipairs(pairs_) do
		local a, b = p[1], p[2]
		row { (VARIANTS[a].short or a) .. " / " .. (VARIANTS[b].short or b), cell(a, b, "store_rate"), cell(a, b, "pop_rate"), cell(a, b, "store_all_us"),
			cell(a, b, "pop_all_us") }
	end
end

local function campaign(P, variants)
	local raw = {}
	for _, v in ipairs(variants) do raw[v] = {} end
	for run = 1, P.runs do
		-- every other round runs in the reverse order: a variant's place in the round
		-- (first, after a server was just torn down, ...) and the drift within a
		-- round then weigh on both sides of a per-round ratio alike
		local order = ordered(variants, RUN_ORDER)
		if run % 2 == 0 then
			for i = 1, #order // 2 do order[i], order[#order + 1 - i] = order[#order + 1 - i], order[i] end
		end
		for _, v in ipairs(order) do
			log("run %d/%d: %s (N=%d, R=%d)", run, P.runs, v, P.N, P.R)
			local r = run_variant(v, P)
			raw[v][#raw[v] + 1] = r
		end
	end
	local summaries = {}
	for _, v in ipairs(variants) do summaries[v] = summarise(raw[v]) end
	return summaries, paired(raw), raw
end

-- --paired-scale: per round and variant, a server of P.N messages (a) and one of PS.N (b),
-- both alive at once. b stores all but its last P.N messages, then a stores its P.N, then
-- b its last P.N (into a store that already holds the rest), seconds after a's; then the
-- pops of both run in alternating slices of C recipients (a, b, b, a, a, b, ...). So the
-- figures compared are taken over the same minutes of this machine, whose speed drifts.
-- Returns the summaries of both sizes and, per variant, the per-round ratios (b over a)
-- of pop CPU per user and of the store rate (b's last P.N messages against a's).
local function paired_scale_campaign(P, PS, variants)
	assert(PS.N > P.N, "--paired-scale needs scale-N > N")
	assert(math.min(opt.pop_users or P.R, P.R) == math.min(opt.pop_users or PS.R, PS.R),
		"--paired-scale needs the same number of logins on both sides (--pop-users)")
	local raw_a, raw_b, ratios = {}, {}, {}
	for _, v in ipairs(variants) do raw_a[v], raw_b[v], ratios[v] = {}, {}, { pop_user = {}, store_rate = {} } end
	for run = 1, P.runs do
		for _, v in ipairs(variants) do
			log("round %d/%d: %s, N=%d and N=%d side by side", run, P.runs, v, P.N, PS.N)
			local a = start_variant(v, P)
			local okb, b = pcall(start_variant, v, PS)
			if not okb then stop_variant(a); error(b, 0) end
			local ok, err = pcall(function()
				store_upto(b, PS.N - P.N)
				store_upto(a, P.N)
				store_upto(b, PS.N)
				local U, slice = a.U, P.C
				for i = 0, (U - 1) // slice do
					local first, last = i * slice + 1, math.min((i + 1) * slice, U)
					for _, x in ipairs(i % 2 == 0 and { a, b } or { b, a }) do pop_range(x, first, last) end
				end
			end)
			if not ok then
				stop_variant(a); stop_variant(b)
				error(format("variant %s failed: %s", v, tostring(err)), 0)
			end
			local oka, ra = pcall(finish_variant, a)
			if not oka then stop_variant(b); error(ra, 0) end
			local rb = finish_variant(b)
			raw_a[v][#raw_a[v] + 1], raw_b[v][#raw_b[v] + 1] = ra, rb
			local pop = derive(rb).pop_cpu_user / derive(ra).pop_cpu_user
			local rate = (rb.last_n / rb.last_wall) / (ra.last_n / ra.last_wall)
			table.insert(ratios[v].pop_user, pop)
			table.insert(ratios[v].store_rate, rate)
			log("  %s: pop CPU per user at N=%d over N=%d %.2f; store rate of the big server's last %d over the small one's %d %.2f",
				v, PS.N, P.N, pop, rb.last_n, ra.last_n, rate)
		end
	end
	local sa, sb = {}, {}
	for _, v in ipairs(variants) do sa[v], sb[v] = summarise(raw_a[v]), summarise(raw_b[v]) end
	return sa, sb, ratios
end

local function print_scale_paired(ratios, variants)
	for _, v in ipairs(variants) do
		local x = ratios[v]
		for _, m in ipairs { { "pop CPU per user", x.pop_user }, { "store rate (last N messages)", x.store_rate } } do
			print(format("  per round, %s: %s at N=%d over N=%d: %s", VARIANTS[v].label, m[1],
				opt.scale_N, opt.N, rounds_text(m[2])))
		end
	end
end

---------------------------------------------------------------------------------------------------
-- Main

local failures = 0
local function check_clean(summaries)
	for _, s in pairs(summaries) do
		local ch = s.checks
		failures = failures + ch.lost + ch.dup + ch.order + ch.nodelay + ch.misrouted + ch.errors + ch.rows + ch.counts
	end
end

local function target(ok, text)
	print(format("  [%s] %s", ok == nil and " ? " or ok and "met" or "MISSED", text))
end

local base, scale, base_paired, scale_paired, base_raw
local P = { N = opt.N, R = opt.R, B = opt.B, S = opt.S, C = opt.C, runs = opt.runs }
if not opt.paired_scale then
	base, base_paired, base_raw = campaign(P, ordered(opt.variants))
	check_clean(base)
	print_table("End-to-end, Prosody " .. server.version .. " (" .. (opt.N == 20000 and "comparison" or "custom") .. ")",
		P, base, ordered(opt.variants))
	print_paired(base_paired)
	print_compact(base, ordered(opt.variants), base_raw)
end
local PS = { N = opt.scale_N, R = opt.scale_R, B = opt.B, S = opt.S, C = opt.C, runs = 1 }
if opt.paired_scale then
	P.runs = opt.runs
	base, scale, scale_paired = paired_scale_campaign(P, PS, ordered(opt.scale_variants))
	check_clean(base)
	check_clean(scale)
	PS.runs = opt.runs
	print_table(format("Paired scale run: servers of N=%d", P.N), P, base, ordered(opt.scale_variants))
	print_table(format("Paired scale run: servers of N=%d, their pops interleaved with the above", PS.N),
		PS, scale, ordered(opt.scale_variants))
	print_scale_paired(scale_paired, ordered(opt.scale_variants))
end

-- Targets (issue 6), from this run's medians.
local function r(a, b, m) return a and b and a[m] and b[m] and b[m] > 0 and a[m] / b[m] or nil end
print()
print("Targets")
if base and base.ours and not opt.paired_scale then
	local o = base.ours
	-- judged on the median of the per-round ratios when there are rounds (each round's
	-- floor and ours run seconds apart); the ratio of the medians is printed with it
	local function paired_target(limit, text, x, rounds)
		local px = rounds and median(rounds)
		local v = px or x
		target(v and v <= limit, text .. (px and format("%.2f (median of per-round ratios; ratio of medians %.2f)", px, x or 0)
			or (x and format("%.2f", x) or "-")))
	end
	-- (each where this run has both sides)
	if base.stub then
		paired_target(1.25, "store CPU/1k ours sqlite within 25% of the floor: ours/floor = ",
			r(o, base.stub, "store_cpu_k"), base_paired and base_paired.floor_store)
	end
	local x
	if base.sql then
		x = r(o, base.sql, "store_rate")
		target(x and x >= 10, format("store msg/s >= 10x bundled/sql: %s", x and format("%.1fx", x) or "-"))
	end
	if base.internal then
		x = r(o, base.internal, "store_rate")
		target(x and x > 1, format("store msg/s > bundled/internal: %s", x and format("%.2fx", x) or "-"))
		paired_target(1, "pop CPU/1k <= bundled/internal: ours/internal = ",
			r(o, base.internal, "pop_cpu_k"), base_paired and base_paired.internal_pop)
	end
end
if base_raw then
	-- PostgreSQL (issue 23), on the median of the per-round ratios
	local function ratio_target(a, b, limit, text)
		local list = round_ratios(base_raw, a, b, "store_rate")
		if list then target(median(list) >= limit, format("%s: %s", text, rounds_text(list))) end
	end
	ratio_target("pg", "ours", 0.5, "store msg/s ours/postgres >= 50% of ours/sqlite, per round")
	ratio_target("pg", "sqlpg", 4, "store msg/s ours/postgres >= 4x bundled on mod_storage_sql/PostgreSQL, per round")
	ratio_target("pg*2", "pg", 1.5, "store msg/s of two ours/postgres nodes >= 1.5x one node's, per round")
end
if scale and scale.ours then
	local o = scale.ours
	if base and base.ours then
		-- with --paired-scale, judged on the median of the per-round ratios (the pops of
		-- both servers interleaved), the ratio of the medians printed with it
		local sp = scale_paired and scale_paired.ours
		local x = r(o, base.ours, "store_rate")
		local px = sp and median(sp.store_rate)
		target((px or x) and (px or x) >= 0.8, format("scale: store msg/s within 20%% of the N=%d rate: %s (CPU/1k ratio %.2f)",
			opt.N, (px or x) and format("%.2f", px or x) or "-", r(o, base.ours, "store_cpu_k") or 0)
			.. (px and format("; median of per-round ratios of the last %d stored, ratio of whole-run medians %.2f",
				opt.N, x or 0) or ""))
		x = r(o, base.ours, "pop_cpu_user")
		px = sp and median(sp.pop_user)
		target((px or x) and (px or x) <= 1.2, format("scale: pop per user unchanged: CPU ms/user ratio %s",
			(px or x) and format("%.2f", px or x) or "-")
			.. (px and format(" (median of per-round ratios of interleaved pops; ratio of medians %.2f)", x or 0) or ""))
		x = r(o, base.ours, "store_rss")
		target(x and x <= 1.2, format("scale: server RSS after the store phase not growing with stored messages:"
			.. " %.1f MB at N=%d vs %.1f MB at N=%d (ratio %.2f)", o.store_rss, opt.scale_N, base.ours.store_rss, opt.N, x or 0))
	end
	local d = o.stanza_bytes and o.disk_msg / o.stanza_bytes
	target(d and d <= 1.5, format("scale: disk <= 1.5x the stanza bytes: %.0f B/msg over %.0f B stanza = %.2f",
		o.disk_msg, o.stanza_bytes or 0, d or 0))
end
target(failures == 0, format("0 lost, 0 duplicated, 0 out of order, 0 missing delay, 0 errors in every run,"
	.. " and with a database the rows stored = the messages sent and every queue count exact (total %d)", failures))
os.exit(failures == 0 and 0 or 1)
