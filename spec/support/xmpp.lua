-- Test support: a small blocking XMPP c2s client for integration specs (loopback, no TLS).
-- LuaSocket for I/O, Prosody's util.xmppstream (expat) for parsing, util.stanza for building.
-- Every top-level element (stanzas and nonzas such as XEP-0198 <r/>) is queued for receive().
-- Usage: local c = assert(xmpp.connect{ port = srv.c2s_port, user = "alice", password = "pw" })

local PROSODY_LIB = "/usr/lib/prosody/"
if not package.path:find(PROSODY_LIB .. "?.lua", 1, true) then
	package.path = package.path .. ";" .. PROSODY_LIB .. "?.lua"
end
if not package.cpath:find(PROSODY_LIB .. "?.so", 1, true) then
	package.cpath = package.cpath .. ";" .. PROSODY_LIB .. "?.so"
end

local socket = require "socket"
local st = require "util.stanza"
local xmppstream = require "util.xmppstream"
local base64_encode = require "util.encodings".base64.encode

local insert, remove = table.insert, table.remove
local format = string.format
local assert, setmetatable, tostring, type, error = assert, setmetatable, tostring, type, error
local gettime, sock_select = socket.gettime, socket.select

local M = {}

local NS_STREAMS = "http://etherx.jabber.org/streams"
local NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
local NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
local NS_PING = "urn:xmpp:ping"
local NS_SM = "urn:xmpp:sm:3"
local DEFAULT_TIMEOUT = 5

local Client = {}
Client.__index = Client

---------------------------------------------------------------------------------------------------
-- Parsing and I/O

local function is_stanza(el)
	return el.attr.xmlns == nil and (el.name == "message" or el.name == "presence" or el.name == "iq")
end

-- util.xmppstream callbacks; `session` is the client itself.
local callbacks = { default_ns = "jabber:client" }

function callbacks.streamopened(client, attr)
	client.notopen = nil
	client.stream_attr = attr
end

function callbacks.streamclosed(client)
	client.closed = client.closed or "stream closed by server"
end

function callbacks.handlestanza(client, el)
	if client.sm_enabled and is_stanza(el) then
		client.sm_h = client.sm_h + 1
		el.sm_h = client.sm_h -- (the h that acks up to this stanza)
		local every = client.sm_ack_every
		if every and client.sm_h % every == 0 then client:ack() end
	end
	if client.sm_auto_ack and el.name == "r" and el.attr.xmlns == NS_SM then
		client:ack()
		return
	end
	if client.sink and el.name == "message" and el.attr.xmlns == nil then
		client.sink(el) -- (long backlogs: counted by the spec, not kept)
		return
	end
	insert(client.queue, el)
end

function callbacks.error(client, err, data)
	if err == "stream-error" then -- <stream:error/>: queue it too, the stream is over
		insert(client.queue, data)
		client.closed = "stream error: " .. tostring(data and data.tags[1] and data.tags[1].name)
	else
		client.closed = format("XML parse error: %s %s", tostring(err), tostring(data or ""))
	end
end

function Client:_open_stream()
	self.notopen = true
	self.stream:reset()
	self:send(format("<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client'"
		.. " xmlns:stream='%s' version='1.0' xml:lang='en'>", self.host, NS_STREAMS))
end

-- Wait up to `timeout` seconds for data, feed it to the parser. Returns false once the connection
-- is unusable (self.closed says why).
function Client:_pump(timeout)
	if self.closed then return false end
	local sock = self.sock
	if not sock:dirty() then
		local readable = sock_select({ sock }, nil, timeout > 0 and timeout or 0)
		if not readable[1] then return true end
	end
	sock:settimeout(0)
	local data, err, partial = sock:receive(65536)
	data = data or partial
	if data and #data > 0 then
		local ok, perr = self.stream:feed(data)
		if not ok then self.closed = self.closed or ("XML parse error: " .. tostring(perr)) end
	end
	if err == "closed" then self.closed = self.closed or "connection closed by server" end
	return not self.closed
end

-- Index of the first queued element matching pred, pumping until the deadline.
function Client:_find(pred, timeout)
	local deadline = gettime() + (timeout or DEFAULT_TIMEOUT)
	local checked = 0
	while true do
		for i = checked + 1, #self.queue do
			if pred(self.queue[i]) then return i end
		end
		checked = #self.queue
		local left = deadline - gettime()
		if left <= 0 or not self:_pump(left) then
			-- one last look in case the final read queued it
			for i = checked + 1, #self.queue do
				if pred(self.queue[i]) then return i end
			end
			return nil, self.closed or "timeout"
		end
	end
end

function Client:_next_id(prefix)
	self.id_counter = self.id_counter + 1
	return (prefix or "t") .. self.id_counter
end

---------------------------------------------------------------------------------------------------
-- Public API

-- Send a util.stanza object or a raw XML string.
function Client:send(x)
	local data = type(x) == "string" and x or tostring(x)
	self.sock:settimeout(DEFAULT_TIMEOUT)
	local ok, err = self.sock:send(data)
	if not ok then error("send failed: " .. tostring(err), 2) end
	return self
end

-- Initial (or updated) presence, with a <priority/> when given.
function Client:presence(priority)
	local p = st.presence()
	if priority then p:text_tag("priority", tostring(priority)) end
	return self:send(p)
end

-- Next top-level element, or nil, "timeout"|reason after `timeout` seconds (default 5).
function Client:receive(timeout)
	local i, err = self:_find(function () return true end, timeout)
	if not i then return nil, err end
	return remove(self.queue, i)
end

-- Everything that arrives within `seconds` (plus anything already queued).
function Client:collect(seconds)
	local deadline = gettime() + (seconds or 1)
	while true do
		local left = deadline - gettime()
		if left <= 0 or not self:_pump(left) then break end
	end
	local out = self.queue
	self.queue = {}
	return out
end

-- First element for which pred(el) is true (it is removed; others stay queued), or nil, err.
function Client:wait_for(pred, timeout)
	local i, err = self:_find(pred, timeout)
	if not i then return nil, err end
	return remove(self.queue, i)
end

-- Round-trip barrier: ping the server and return (and dequeue) every element received before the
-- pong. Raises an error if no pong arrives within `timeout` (default 5).
function Client:ping(timeout)
	local id = self:_next_id("ping")
	self:send(st.iq({ type = "get", to = self.host, id = id }):tag("ping", { xmlns = NS_PING }))
	local i, err = self:_find(function (el)
		return el.name == "iq" and el.attr.id == id and (el.attr.type == "result" or el.attr.type == "error")
	end, timeout)
	if not i then error("ping: no reply (" .. tostring(err) .. ")", 2) end
	local before = {}
	for j = 1, i - 1 do before[j] = self.queue[j] end
	local rest = {}
	for j = i + 1, #self.queue do rest[#rest + 1] = self.queue[j] end
	self.queue = rest
	return before
end

-- XEP-0198: enable stream management (resume='true'). Counts inbound stanzas in c.sm_h from here
-- on; <r/> requests are queued for the test to see unless opts.auto_ack (answer each at once);
-- opts.ack_every = N also sends <a/> after every N stanzas received (slixmpp-style). A client
-- with neither withholds its acks. Returns <enabled/> or nil, err.
function Client:enable_sm(opts)
	opts = opts or {}
	self.sm_enabled, self.sm_h = true, 0
	self:send(st.stanza("enable", { xmlns = NS_SM, resume = opts.resume == false and nil or "true" }))
	local el, err = self:wait_for(function (e)
		return e.attr.xmlns == NS_SM and (e.name == "enabled" or e.name == "failed")
	end, opts.timeout)
	if not el then return nil, err end
	if el.name == "failed" then
		self.sm_enabled = false
		return nil, "sm failed: " .. tostring(el.tags[1] and el.tags[1].name)
	end
	self.sm_id = el.attr.id
	self.sm_auto_ack = opts.auto_ack or false
	self.sm_ack_every = opts.ack_every
	return el
end

-- Messages received: up to `n` of them (removed from the queue; other elements stay), waiting
-- until none has arrived for `quiet` seconds (default 1) or `timeout` in all (default 30).
function Client:read_messages(n, quiet, timeout)
	local out = {}
	local deadline = gettime() + (timeout or 30)
	local last = gettime()
	local more = true
	while #out < n do
		local i = 1
		while i <= #self.queue and #out < n do
			local el = self.queue[i]
			if el.name == "message" and el.attr.xmlns == nil then
				out[#out + 1] = remove(self.queue, i)
				last = gettime()
			else
				i = i + 1
			end
		end
		if #out >= n or not more then break end
		local now = gettime()
		local left = math.min(deadline - now, last + (quiet or 1) - now)
		if left <= 0 then break end
		more = self:_pump(left) -- (false once closed: what it queued is still taken above)
	end
	return out
end

-- XEP-0198: acknowledge everything received so far (<a h='sm_h'/>), or up to `h` (a received
-- stanza's el.sm_h acks it and what came before it).
function Client:ack(h)
	return self:send(st.stanza("a", { xmlns = NS_SM, h = tostring(h or self.sm_h or 0) }))
end

-- XEP-0198: ask the server for an ack (<r/>); the <a/> shows up in receive().
function Client:request_ack()
	return self:send(st.stanza("r", { xmlns = NS_SM }))
end

-- Close the stream politely and wait (up to `timeout`, default 2 s) for the server's side.
function Client:close(timeout)
	if not self.sock_closed then
		if not self.closed then
			self.sock:settimeout(DEFAULT_TIMEOUT)
			self.sock:send("</stream:stream>")
			local deadline = gettime() + (timeout or 2)
			while not self.closed and gettime() < deadline do
				self:_pump(deadline - gettime())
			end
		end
		self.sock:close()
		self.sock_closed = true
		self.closed = self.closed or "closed by client"
	end
end

-- Drop the TCP connection without closing the stream (simulates a lost connection).
function Client:drop()
	if not self.sock_closed then
		self.sock:close()
		self.sock_closed = true
		self.closed = "dropped by client"
	end
end

---------------------------------------------------------------------------------------------------
-- Connect

local function fail(client, msg)
	client:drop()
	return nil, msg
end

local function is_features(el) return el.name == "features" and el.attr.xmlns == NS_STREAMS end

-- opts: port (required), host ("localhost"), user, password, resource ("test"), address
-- ("127.0.0.1"), timeout (5), nodelay (TCP_NODELAY, as most clients); resume = { previd, h } (with auto_ack, ack_every as enable_sm)
-- resumes a XEP-0198 session instead of binding. Returns a bound client, or nil, err.
function M.connect(opts)
	assert(opts.user and opts.password, "connect: user and password required")
	local timeout = opts.timeout or DEFAULT_TIMEOUT
	local host = opts.host or "localhost"
	local sock = socket.tcp()
	sock:settimeout(timeout)
	local ok, err = sock:connect(opts.address or "127.0.0.1", assert(opts.port, "connect: port required"))
	if not ok then sock:close(); return nil, "connect failed: " .. tostring(err) end
	if opts.nodelay then sock:setoption("tcp-nodelay", true) end

	local c = setmetatable({ sock = sock, host = host, user = opts.user, queue = {}, id_counter = 0 }, Client)
	c.stream = xmppstream.new(c, callbacks)

	-- Stream 1: SASL PLAIN.
	c:_open_stream()
	local features, ferr = c:wait_for(is_features, timeout)
	if not features then return fail(c, "no stream features: " .. tostring(ferr)) end
	local token = base64_encode("\0" .. opts.user .. "\0" .. opts.password)
	c:send(st.stanza("auth", { xmlns = NS_SASL, mechanism = "PLAIN" }):text(token))
	local res, aerr = c:wait_for(function (el)
		return el.attr.xmlns == NS_SASL and (el.name == "success" or el.name == "failure")
	end, timeout)
	if not res then return fail(c, "no SASL reply: " .. tostring(aerr)) end
	if res.name == "failure" then
		return fail(c, "auth failed: " .. tostring(res.tags[1] and res.tags[1].name))
	end

	-- Stream 2: resource binding, or XEP-0198 resumption of opts.resume = { previd =, h = }.
	c:_open_stream()
	features, ferr = c:wait_for(is_features, timeout)
	if not features then return fail(c, "no stream features after auth: " .. tostring(ferr)) end
	if opts.resume then
		-- The inbound count goes on from what we say we have handled, from before the
		-- <resume/>: the server may send the rest of the session in the same write as its
		-- <resumed/>, and those stanzas (and an <r/> among them) must be counted and answered.
		c.sm_enabled, c.sm_h, c.sm_id = true, opts.resume.h, opts.resume.previd
		c.sm_auto_ack, c.sm_ack_every = opts.auto_ack or false, opts.ack_every
		c:send(st.stanza("resume", { xmlns = NS_SM, previd = opts.resume.previd, h = tostring(opts.resume.h) }))
		local r, rerr = c:wait_for(function (el)
			return el.attr.xmlns == NS_SM and (el.name == "resumed" or el.name == "failed")
		end, timeout)
		if not r then return fail(c, "no resume reply: " .. tostring(rerr)) end
		if r.name == "failed" then return fail(c, "resume failed: " .. tostring(r)) end
		c.resumed = r
		c.features = features
		return c
	end
	local id = c:_next_id("bind")
	c:send(st.iq({ type = "set", id = id })
		:tag("bind", { xmlns = NS_BIND }):text_tag("resource", opts.resource or "test"))
	local iq, berr = c:wait_for(function (el) return el.name == "iq" and el.attr.id == id end, timeout)
	if not iq then return fail(c, "no bind reply: " .. tostring(berr)) end
	local jid = iq.attr.type == "result" and iq:find("{" .. NS_BIND .. "}bind/jid#")
	if not jid then return fail(c, "bind failed: " .. tostring(iq)) end
	c.jid = jid
	c.features = features
	return c
end

M.stanza = st -- convenience: xmpp.stanza.message{...}

return M
