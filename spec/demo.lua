-- `make demo`: a real Prosody on loopback with this checkout's mod_offline on the sqlite
-- default. Alice writes to Bob while he is offline; Bob logs in and receives the messages
-- with their delay stamps. Prints what happens and exits 0 only if everything arrived.

package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;/usr/lib/prosody/?.lua;" .. package.path
package.cpath = "build/?.so;" .. package.cpath .. ";/usr/lib/prosody/?.so"

local server = require "support.prosody"
local xmpp = require "support.xmpp"
local core = require "offline_store.core"
local st = require "util.stanza"

local root = io.popen("pwd"):read("l")
local function say(fmt, ...) io.write((fmt .. "\n"):format(...)) end

local srv = server.start { plugin_paths = { root .. "/lua" }, users = { alice = "alicepw", bob = "bobpw" } }
local ok, err = pcall(function()
	say("Prosody is listening on 127.0.0.1:%d (data in %s)", srv.c2s_port, srv.dir .. "/data")
	local file = srv.dir .. "/data/offline.sqlite"
	local function queued()
		local db = assert(core.open_sqlite(file))
		local n = db:count("localhost", "bob")
		db:close()
		return n
	end

	local alice = assert(xmpp.connect { port = srv.c2s_port, user = "alice", password = "alicepw", resource = "laptop" })
	alice:presence()
	alice:ping()
	say("\nalice@localhost is online; bob@localhost is not. Alice sends three messages:")
	local bodies = { "Are you there?", "Lunch at noon tomorrow?", "Call me when you are back." }
	for i, body in ipairs(bodies) do
		alice:send(st.message({ to = "bob@localhost", type = "chat", id = "demo" .. i }):tag("body"):text(body):up())
		say("  -> %s", body)
	end
	local bounced = alice:ping()
	assert(#bounced == 0, "alice got a reply: " .. tostring(bounced[1]))
	local before = queued()
	say("\nQueued for bob in %s: %d", file, before)

	say("\nBob logs in and sends his initial presence; he receives:")
	local bob = assert(xmpp.connect { port = srv.c2s_port, user = "bob", password = "bobpw", resource = "phone" })
	bob:presence()
	local got = {}
	for _, s in ipairs(bob:collect(1)) do
		if s.name == "message" then
			local delay = s:get_child("delay", "urn:xmpp:delay")
			got[#got + 1] = s:get_child_text("body")
			say("  <- %-30s delay from=%s stamp=%s (%s)", s:get_child_text("body"), delay.attr.from,
				delay.attr.stamp, delay:get_text())
		end
	end
	local after = queued()
	say("\nQueued for bob after his login: %d", after)
	alice:close()
	bob:close()
	assert(before == #bodies, "expected 3 queued messages, found " .. before)
	assert(#got == #bodies, ("expected %d messages at login, got %d"):format(#bodies, #got))
	for i, body in ipairs(bodies) do assert(got[i] == body, "message " .. i .. " differs or is out of order") end
	assert(after == 0, "the queue should be empty after delivery")
end)
srv:cleanup()
if not ok then
	say("\nDEMO FAILED: %s", err)
	os.exit(1)
end
say("\nDemo OK: 3 stored while offline, 3 delivered in order with their delay, queue empty.")
