-- One of several processes hammering one PostgreSQL store (spec/core_postgres_spec.lua):
--   lua5.4 spec/support/postgres_worker.lua MODE CONNINFO OUTFILE START_AT [key=value ...]
-- Waits until START_AT (socket.gettime()), so that all workers start together, then runs MODE and
-- writes one line per outcome to OUTFILE, ending with "done". Modes:
--   store   n stores of "<tag>:<i>" to host/user (users=a,b,c rotates), limit max / max_bytes,
--           every expire_every-th message expiring at ts + 1, dedup key "<dedup>:<i>" when dedup
--           is given; evict=1: over the limit, drop the oldest to make room (a line "evicted N"
--           after each "ok" that evicted); lines "ok ID XML", "limit COUNT", "dup COUNT";
--           batch=N: N stores per batch (db:begin .. db:commit), their "ok" lines written once it
--           committed, else "lost N"; send=1 (with batch): db:send, the outcomes read from
--           db:outcome once the batch committed; ready=FILE go=FILE: after the first store, creates FILE
--           `ready` and waits for `go` to exist, then hold=S seconds (default 0)
--   lease   as owner <tag>: lease up to 7 rows, confirm them, again, until the queue is empty;
--           one line "leased ID,ID,..." per lease that returned rows
--   pop     pops host/user until the file `stop` exists, then once more; "pop ID XML", "expired N"
--   bulk    until `stop` exists: delete_expired(now), delete_older_than(cutoff), remove_user(victim);
--           "touched N"
--   open    opens the store (schema set-up racing other workers) and stores one message
-- Any failure is a line "fail CODE MESSAGE".

local root = arg[0]:match("^(.*)/spec/support/postgres_worker%.lua$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/spec/?.lua;" .. package.path
package.cpath = (os.getenv("OFFLINE_STORE_CPATH") or (root .. "/build/?.so")) .. ";" .. package.cpath

local core = require "offline_store.core"
local socket = require "socket"

local mode, conninfo, outfile, start_at = arg[1], arg[2], arg[3], tonumber(arg[4])
local opt = {}
for i = 5, #arg do
	local k, v = arg[i]:match("^([%w_]+)=(.*)$")
	opt[k] = v
end
local function num(k, default) return tonumber(opt[k]) or default end

local out = assert(io.open(outfile, "w"))
local function say(...) out:write(table.concat({ ... }, " "), "\n") end
local function fail(msg, code) say("fail", tostring(code), (tostring(msg):gsub("\n", " "))) end

local function stopped() local f = io.open(opt.stop or "/nonexistent", "r"); if f then f:close() end; return f ~= nil end

local T0 = 1700000000 * 1000000
local host, user = opt.host or "example.org", opt.user or "bob"

local function wait_start() while socket.gettime() < start_at do socket.sleep(0.002) end end
if mode == "open" then wait_start() end

local db, err, code = core.open_postgres(conninfo)
if not db then
	fail(err, code)
	say("done")
	out:close()
	os.exit(0, true)
end

wait_start()

if mode == "store" then
	local users = {}
	for u in (opt.users or user):gmatch("[^,]+") do users[#users + 1] = u end
	local every, per = num("expire_every", 0), num("batch", 0)
	local held, open, sends = {}, false, 0
	local DEADLOCK = tonumber("40P01", 36) -- (a batch stored again came out otherwise: lost, not a failure)
	local function settle(ok, e, c)
		if ok then
			for _, line in ipairs(held) do
				if line[1] == "send" then
					local n, id, cur = db:outcome(line[2])
					if n then say("ok", id, line[3], line[4])
					else say(id == "duplicate" and "dup" or "limit", cur) end
				else
					say(table.unpack(line))
				end
			end
		else
			if e and c ~= DEADLOCK then fail(e, c) end
			say("lost", #held)
		end
		held, open = {}, false
	end
	for i = 1, num("n", 100) do
		local u = users[(i - 1) % #users + 1]
		local ts = T0 + i
		local expire = every > 0 and i % every == 0 and ts + 1 or nil
		local xml = (opt.tag or "w") .. ":" .. i
		if per > 0 and not open then open, sends = assert(db:begin()), 0 end
		local c, id, cur
		if open and opt.send == "1" then
			c, id, cur = db:send(host, u, "sender@example.org", xml, ts, expire, num("max"), num("max_bytes"),
				nil, opt.dedup and (opt.dedup .. ":" .. i))
			if c then sends = sends + 1; c, id = false, "sent" end
		else
			c, id, cur = db:store(host, u, "sender@example.org", xml, ts, expire, num("max"), num("max_bytes"),
				nil, opt.dedup and (opt.dedup .. ":" .. i), opt.evict == "1")
		end
		if id == "sent" then
			held[#held + 1] = { "send", sends, xml, u }
		elseif c then
			local line = { "ok", id, xml, u }
			if open then held[#held + 1] = line else say(table.unpack(line)) end
			if cur and cur > 0 then say("evicted", cur) end
		elseif c == false then say(id == "duplicate" and "dup" or "limit", cur)
		else
			if open then settle(false) end
			if cur ~= DEADLOCK then fail(id, cur) end
		end
		if i == 1 and opt.ready then
			assert(io.open(opt.ready, "w")):close()
			repeat
				local f = io.open(opt.go or "/nonexistent")
				if f then f:close() else socket.sleep(0.002) end
			until f
			socket.sleep(num("hold", 0))
		end
		if open and (#held >= per or i == num("n", 100)) then settle(db:commit()) end
	end
	if open then settle(db:commit()) end
elseif mode == "pop" then
	local last
	repeat
		last = stopped()
		local items, expired, c = db:pop(host, user, T0 + 1000000000)
		if items then
			for _, it in ipairs(items) do say("pop", it.id, it.xml) end
			if expired > 0 then say("expired", expired) end
		else
			fail(expired, c)
		end
		socket.sleep(0.003)
	until last
elseif mode == "lease" then
	while true do
		local items, held, c = db:lease(host, user, opt.tag, T0, T0 + 1000000000, 7)
		if not items then fail(held, c); break end
		if #items > 0 then
			local ids = {}
			for i, it in ipairs(items) do ids[i] = it.id end
			say("leased", table.concat(ids, ","))
			local n, e, c2 = db:confirm(host, user, ids)
			if n ~= #ids then fail(e or ("confirmed " .. tostring(n)), c2) end
		elseif not held then
			break
		end
	end
elseif mode == "bulk" then
	local last
	repeat
		last = stopped()
		for _, call in ipairs {
			function() return db:delete_expired(T0 + num("now", 50)) end,
			function() return db:delete_older_than(T0 + num("cutoff", 20)) end,
			function() return db:remove_user(host, opt.victim or "victim") end,
		} do
			local n, e, c = call()
			if n then say("touched", n) else fail(e, c) end
		end
		socket.sleep(0.01)
	until last
elseif mode == "open" then
	local c, id = db:store(host, user, "sender@example.org", opt.tag or "opened", T0)
	if c then say("ok", id) else fail(id) end
end

db:close()
say("done")
out:close()
os.exit(0, true)
