-- bench/drain.lua: one login drains a backlog, in a real Prosody 0.12 on loopback.
--
--   make bench-drain                      N = 1000 and 100000, every variant, 1 run each
--   lua5.4 bench/drain.lua -N 1000,20000 --runs 3 [--variants acked-sm,main-sm]
--
-- Variants (each a fresh server with mod_smacks loaded, the backlog written into its sqlite
-- file with the server stopped, then one login):
--   main-plain    the plugin of main before acknowledged delivery (commit 5b1a21b, its lua/
--                 and its core.so built from its src/ in build/drain-main/, by `git archive`):
--                 the whole queue popped and written at once; client without XEP-0198
--   main-sm       the same plugin, client with XEP-0198 answering every <r/>
--   paged-plain   this checkout: pages popped as the connection drains; no XEP-0198
--   acked-sm      this checkout: pages leased, an <r/> after each, deleted when acked; the
--                 client answers every <r/>
-- Measured: wall seconds from the initial presence to the last message received, messages/s,
-- server CPU (utime+stime of the prosody process, /proc/PID/stat) per message over that
-- interval, and the process's peak RSS (VmHWM, /proc/PID/status: includes start-up).
-- The client is the specs' Lua client (util.xmppstream); it shares the 2 cores. A run ends at
-- the last message, or after 30 s without one (main's plugin sends nothing until it has built
-- and written its whole queue: over 5 s at N=100,000 with XEP-0198 on a loaded machine).
--
-- Profiles (one file per variant and N): --perf PREFIX records the server with `perf record`
-- during the drain (PREFIX.VARIANT.N.data; `perf report -i FILE --sort dso`); --lua-profile
-- PREFIX loads bench/profile/mod_bench_lua_profile.lua into the server, which writes where its
-- Lua code spends its VM instructions, per function and per line (PREFIX.VARIANT.N.txt).

local function script_dir()
	local src = debug.getinfo(1, "S").source:sub(2)
	return src:match("^(.*)/[^/]*$") or "."
end
local ROOT = assert(io.popen("cd '" .. script_dir() .. "/..' && pwd")):read("l")
package.path = ROOT .. "/spec/?.lua;" .. ROOT .. "/lua/?.lua;/usr/lib/prosody/?.lua;" .. package.path
package.cpath = ROOT .. "/build/?.so;" .. package.cpath .. ";/usr/lib/prosody/?.so"

local server = require "support.prosody"
local xmpp = require "support.xmpp"
local socket = require "socket"

local MAIN_COMMIT = "5b1a21b"
local PW = "pw"

-- `lua5.4 bench/drain.lua --fill CORE FILE N`: writes the backlog (run as a child process, so
-- that each run loads one core.so only: two builds in one process share a metatable name).
if arg[1] == "--fill" then
	local core = assert(package.loadlib(arg[2], "luaopen_offline_store_core"))("offline_store.core")
	local n = tonumber(arg[4])
	local db = assert(core.open_sqlite(arg[3]))
	local t0 = (os.time() - 3600) * 1000000
	assert(db:begin())
	for i = 1, n do
		assert(db:store("localhost", "bob", "alice@localhost/r",
			("<message xmlns='jabber:client' from='alice@localhost/r' to='bob@localhost' type='chat' id='m%d'>"
				.. "<body>message number %d, a short chat line</body></message>"):format(i, i), t0 + i))
	end
	assert(db:commit())
	db:close()
	os.exit(0)
end

local Ns, runs = { 1000, 100000 }, 1
local only, perf_prefix, lua_prefix
do
	local i = 1
	while arg[i] do
		if arg[i] == "-N" then
			Ns = {}
			for n in arg[i + 1]:gmatch("%d+") do Ns[#Ns + 1] = tonumber(n) end
			i = i + 1
		elseif arg[i] == "--runs" then runs = tonumber(arg[i + 1]); i = i + 1
		elseif arg[i] == "--perf" then perf_prefix = arg[i + 1]; i = i + 1
		elseif arg[i] == "--lua-profile" then lua_prefix = arg[i + 1]; i = i + 1
		elseif arg[i] == "--variants" then
			only = {}
			for v in arg[i + 1]:gmatch("[^,]+") do only[v] = true end
			i = i + 1
		else error("unknown argument " .. arg[i]) end
		i = i + 1
	end
end

local function sh(cmd)
	local ok = os.execute(cmd)
	if not ok then error("failed: " .. cmd) end
end

local read_file = require "support.util".read

-- main's plugin and core, built once into build/drain-main/.
local MAIN = ROOT .. "/build/drain-main"
local function build_main()
	if read_file(MAIN .. "/build/offline_store/core.so") then return end
	sh(("rm -rf '%s' && mkdir -p '%s'"):format(MAIN, MAIN))
	sh(("cd '%s' && git archive %s lua src Makefile | tar -x -C '%s'"):format(ROOT, MAIN_COMMIT, MAIN))
	sh(("cd '%s' && make -s build/offline_store/core.so >/dev/null"):format(MAIN))
end

local function cpu_seconds(pid)
	local stat = assert(read_file("/proc/" .. pid .. "/stat"))
	local fields = {}
	for f in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = f end
	return (tonumber(fields[12]) + tonumber(fields[13])) / 100 -- (USER_HZ = 100)
end

local function hwm_mib(pid)
	local status = read_file("/proc/" .. pid .. "/status") or ""
	return (tonumber(status:match("VmHWM:%s*(%d+)")) or 0) / 1024
end

local VARIANTS = {
	{ name = "main-plain", main = true, sm = false },
	{ name = "main-sm", main = true, sm = true },
	{ name = "paged-plain", main = false, sm = false },
	{ name = "acked-sm", main = false, sm = true },
}

local function run_one(v, n)
	local plugins = v.main and (MAIN .. "/lua") or (ROOT .. "/lua")
	local core_path = (v.main and MAIN or ROOT) .. "/build/offline_store/core.so"
	local srv = server.start {
		plugin_paths = { plugins, ROOT .. "/bench/profile" },
		users = { bob = PW },
		modules_enabled = { "smacks", lua_prefix and "bench_lua_profile" or nil },
		host = 'access = { max_user_offline_messages = { { acl = "all", value = "infinity" } } }',
		global = 'log = { error = "' .. "/dev/null" .. '" }'
			.. (lua_prefix and ('\nbench_lua_profile = "%s.%s.%d.txt"'):format(lua_prefix, v.name, n) or ""),
	}
	local ok, res = pcall(function()
		-- the store file as the plugin creates it, then the backlog, server stopped
		srv:stop()
		sh(("lua5.4 '%s/bench/drain.lua' --fill '%s' '%s' %d"):format(ROOT, core_path, srv.dir .. "/data/offline.sqlite", n))
		srv:restart()
		local pid = srv:pid()
		local c = assert(xmpp.connect { port = srv.c2s_port, user = "bob", password = PW, resource = "r", nodelay = true })
		if v.sm then assert(c:enable_sm { auto_ack = true }) end
		local count, last, ordered, last_t = 0, 0, true, nil
		c.sink = function(m)
			count, last_t = count + 1, socket.gettime() -- (messages may arrive inside c:presence())
			local k = tonumber(m.attr.id:match("%d+"))
			if k ~= last + 1 then ordered = false end
			last = k
		end
		local perf
		if perf_prefix then
			local out = ("%s.%s.%d.data"):format(perf_prefix, v.name, n)
			local p = assert(io.popen(("perf record -q -F 499 -p %d -o '%s' 2>/dev/null & echo $!"):format(pid, out)))
			perf = p:read("l")
			p:close()
			socket.sleep(0.3)
		end
		local cpu0, w0 = cpu_seconds(pid), socket.gettime()
		c:presence()
		local w1 = w0
		while count < n do
			local before = count
			c:collect(0.05)
			if count > before then w1 = socket.gettime()
			elseif socket.gettime() - w1 > 30 then break end
		end
		local cpu1 = cpu_seconds(pid)
		local hwm = hwm_mib(pid)
		if perf then sh("kill -INT " .. perf .. "; while kill -0 " .. perf .. " 2>/dev/null; do sleep 0.1; done") end
		c:close()
		return { n = count, ordered = ordered, wall = (last_t or w0) - w0, cpu = cpu1 - cpu0, hwm = hwm }
	end)
	srv:cleanup()
	if not ok then error(res, 0) end
	return res
end

local function median(list)
	local t = table.move(list, 1, #list, 1, {})
	table.sort(t)
	local m = #t // 2
	if #t % 2 == 1 then return t[m + 1] end
	return (t[m] + t[m + 1]) / 2
end

build_main()
print(("%-12s %8s %9s %10s %14s %12s  %s"):format("variant", "N", "wall s", "msg/s", "CPU us/msg", "peak RSS MiB", "check"))
local seen = {} -- [n][variant] = { rate = {...}, cpu = {...}, hwm = {...} }
for _, n in ipairs(Ns) do
	seen[n] = {}
	for _ = 1, runs do
		for _, v in ipairs(VARIANTS) do
			if not only or only[v.name] then
				local r = run_one(v, n)
				local m = seen[n][v.name] or { rate = {}, cpu = {}, hwm = {} }
				seen[n][v.name] = m
				m.rate[#m.rate + 1], m.cpu[#m.cpu + 1], m.hwm[#m.hwm + 1] = r.n / r.wall, r.cpu / r.n * 1e6, r.hwm
				print(("%-12s %8d %9.2f %10.0f %14.1f %12.1f  %s"):format(v.name, n, r.wall, r.n / r.wall,
					r.cpu / r.n * 1e6, r.hwm,
					(r.n == n and r.ordered) and "all, in order" or ("GOT " .. r.n .. (r.ordered and "" or ", OUT OF ORDER")))
				)
				io.stdout:flush()
			end
		end
	end
end

-- Medians over the runs, and CPU per message against the plugin of before (same client kind).
print(("\nmedians of %d run(s)"):format(runs))
print(("%-12s %8s %10s %14s %12s %16s %16s"):format("variant", "N", "msg/s", "CPU us/msg", "peak RSS MiB",
	"CPU / main-plain", "CPU / main-sm"))
for _, n in ipairs(Ns) do
	local base_plain = seen[n]["main-plain"] and median(seen[n]["main-plain"].cpu)
	local base_sm = seen[n]["main-sm"] and median(seen[n]["main-sm"].cpu)
	for _, v in ipairs(VARIANTS) do
		local m = seen[n][v.name]
		if m then
			local cpu = median(m.cpu)
			print(("%-12s %8d %10.0f %14.1f %12.1f %16s %16s"):format(v.name, n, median(m.rate), cpu, median(m.hwm),
				base_plain and ("%.2fx"):format(cpu / base_plain) or "-", base_sm and ("%.2fx"):format(cpu / base_sm) or "-"))
		end
	end
end
