-- Test support: a TCP proxy on loopback between a client and PostgreSQL that can lose a
-- COMMIT's answer on purpose. Run as its own process (the client blocks in libpq meanwhile):
--
--   lua5.4 spec/support/pg_proxy.lua TARGET_PORT DIR
--
-- It listens on a free port of 127.0.0.1, writes that port to DIR/port and forwards every
-- connection to 127.0.0.1:TARGET_PORT. When DIR/arm exists and a client sends a chunk that
-- contains "COMMIT", it reads the mode from DIR/arm, deletes the file (one shot) and:
--   after   forwards the chunk to the server, then drops the client's connection and closes its
--           own sending side towards the server: the server gets the COMMIT, its answer never
--           reaches the client;
--   before  drops both sides without forwarding it: the server never gets the COMMIT;
--   hold    drops the client's side only, without forwarding it: the server's session stays
--           idle in its transaction (as behind a dead network) until it is terminated.
-- Then it writes the mode to DIR/fired. It exits when DIR/stop exists, or after 300 s.
-- While DIR/blackhole exists the database is away behind a silent network: the connections
-- open when the file appeared are dropped, and new ones are accepted but never answered nor
-- forwarded (what they send is read and discarded) until their client gives up; once the
-- file is gone, new connections are forwarded again. DIR/state says which of the two
-- ("blackhole", "forward") is in force, DIR/held how many connections are held.

package.path = (arg[0]:match("^(.*)/support/[^/]*$") or "spec") .. "/?.lua;" .. package.path
local socket = require "socket"
local support = require "support.util"

local read = support.read
local target_port, dir = tonumber(arg[1]), arg[2]
assert(target_port and dir, "usage: pg_proxy.lua TARGET_PORT DIR")

-- Written whole or not at all: the spec polls these files.
local function write(path, data)
	support.write(path .. ".tmp", data)
	assert(os.rename(path .. ".tmp", path))
end

local server = assert(socket.bind("127.0.0.1", 0))
server:settimeout(0)
write(dir .. "/port", tostring(select(2, server:getsockname())))

local peer = {}       -- socket -> the socket it forwards to (nil: read and discard)
local from_client = {} -- sockets whose data goes to the server

local function send_all(s, data)
	local i = 1
	while i <= #data do
		local n, err, last = s:send(data, i)
		if n then
			i = n + 1
		elseif err == "closed" then
			return
		else
			i = last + 1
			socket.select(nil, { s }, 1)
		end
	end
end

local function drop(s)
	peer[s], from_client[s] = nil, nil
	s:close()
end

-- What to do with a chunk a client sent: "forward", or an armed mode.
local function armed(data)
	if not data:find("COMMIT", 1, true) then return nil end
	local mode = read(dir .. "/arm")
	if not mode then return nil end
	os.remove(dir .. "/arm")
	return mode:match("%a+")
end

local held = {} -- connections accepted while blackholing: read, never answered
local blackhole, nheld = false, -1

local function count_held()
	local n = 0
	for _ in pairs(held) do n = n + 1 end
	if n ~= nheld then nheld = n; write(dir .. "/held", tostring(n)) end
end

local deadline = socket.gettime() + 300
while socket.gettime() < deadline and not read(dir .. "/stop") do
	local now_blackhole = read(dir .. "/blackhole") ~= nil
	if now_blackhole and not blackhole then
		local open = {}
		for s in pairs(peer) do open[#open + 1] = s end
		for _, s in ipairs(open) do drop(s) end
	end
	if now_blackhole ~= blackhole or nheld < 0 then write(dir .. "/state", now_blackhole and "blackhole" or "forward") end
	blackhole = now_blackhole
	count_held()
	local watch = { server }
	for s in pairs(peer) do watch[#watch + 1] = s end
	for s in pairs(held) do watch[#watch + 1] = s end
	local readable = socket.select(watch, nil, 0.05)
	for _, s in ipairs(readable) do
		if held[s] then
			local _, err = s:receive(8192)
			if err == "closed" then held[s] = nil; s:close() end
		elseif s == server then
			local c = server:accept()
			if c and blackhole then
				c:settimeout(0)
				held[c] = true
			elseif c then
				local u = socket.tcp()
				if u:connect("127.0.0.1", target_port) then
					c:settimeout(0)
					u:settimeout(0)
					peer[c], peer[u], from_client[c] = u, c, true
				else
					c:close()
				end
			end
		elseif peer[s] ~= nil or from_client[s] then
			local data, err, partial = s:receive(8192)
			data = data or partial
			local other = peer[s]
			local mode = from_client[s] and data and armed(data)
			if mode then
				write(dir .. "/fired", mode) -- before the client can notice
				if mode == "after" then send_all(other, data) end
				-- The server side keeps being read (and discarded) until it closes: closing a
				-- socket with unread input would reset the connection.
				if mode ~= "hold" then other:shutdown("send") end
				peer[other] = false
				drop(s)
			else
				if data and #data > 0 and other then send_all(other, data) end
				if err == "closed" then
					if other then other:shutdown("send"); peer[other] = false end
					drop(s)
				end
			end
		end
	end
end
