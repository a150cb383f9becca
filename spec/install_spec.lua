-- The documented install path (README "Install"): `luarocks make` into a tree, then
-- Prosody's plugin_paths pointing at the tree's share/lua/5.4. Builds from a copy of the
-- sources so the checkout stays clean, then runs a real server on the installed files.

local lu = require "luaunit"
local support = require "support.util"
local server = require "support.prosody"
local xmpp = require "support.xmpp"
local st = require "util.stanza"

local ROOT = select(2, support.sh("pwd")):gsub("%s+$", "")
local ROCKSPEC = select(2, support.sh("ls " .. support.quote(ROOT) .. "/offline-store-*.rockspec")):gsub("%s+$", "")

-- The Lua modules of the checkout, which `luarocks make` must install: module name -> file.
local function lua_modules()
	local want = { mod_offline = "lua/mod_offline.lua", mod_offline_stub = "lua/mod_offline_stub.lua" }
	local p = io.popen("cd " .. support.quote(ROOT) .. " && ls lua/offline_store/*.lua")
	for file in p:lines() do
		local base = file:match("([^/]+)%.lua$")
		want[base == "init" and "offline_store" or ("offline_store." .. base)] = file
	end
	p:close()
	return want
end

-- Every Lua module is installed: a module added under lua/ and not listed fails here.
TestInstall = {}

function TestInstall:setUp()
	self.dir = support.tmpdir()
	self.tree = self.dir .. "/tree"
end

function TestInstall:tearDown()
	if self.srv then self.srv:cleanup() end
	support.rmrf(self.dir)
end

function TestInstall:test_luarocks_make_then_prosody_uses_the_tree()
	local src = self.dir .. "/src"
	assert(support.sh(("mkdir -p %s && cp -r %s/src %s/lua %s/Makefile %s %s/"):format(support.quote(src),
		support.quote(ROOT), support.quote(ROOT), support.quote(ROOT), support.quote(ROCKSPEC), support.quote(src))))
	local ok, out = support.sh(("cd %s && luarocks --lua-version 5.4 make --tree %s %s"):format(
		support.quote(src), support.quote(self.tree), support.quote(ROCKSPEC:match("[^/]+$"))))
	lu.assertTrue(ok, out)
	local lua_dir = self.tree .. "/share/lua/5.4"
	for _, file in pairs(lua_modules()) do
		local f = file:gsub("^lua/", "/")
		lu.assertNotNil(support.read(lua_dir .. f), f)
	end
	lu.assertNotNil(support.read(self.tree .. "/lib/lua/5.4/offline_store/core.so"))

	-- the installed modules load by themselves from the tree's paths
	ok, out = support.sh(("lua5.4 -e %s"):format(support.quote(([[
		package.path = %q; package.cpath = %q
		local db = assert(require("offline_store").open({ backend = "memory" }))
		print(db:store("h", "u", "f", "x", 1), package.searchpath("offline_store.core", package.cpath))
	]]):format(lua_dir .. "/?.lua;" .. lua_dir .. "/?/init.lua", self.tree .. "/lib/lua/5.4/?.so"))))
	lu.assertTrue(ok, out)
	lu.assertStrContains(out, "1\t" .. self.tree .. "/lib/lua/5.4/offline_store/core.so")

	-- and Prosody finds both through plugin_paths alone
	self.srv = server.start { plugin_paths = { lua_dir }, users = { alice = "pw", bob = "pw" } }
	local a = assert(xmpp.connect { port = self.srv.c2s_port, user = "alice", password = "pw" })
	a:presence()
	a:ping()
	a:send(st.message({ to = "bob@localhost", type = "chat", id = "inst1" }):tag("body"):text("installed"):up())
	lu.assertEquals(#a:ping(), 0)
	local b = assert(xmpp.connect { port = self.srv.c2s_port, user = "bob", password = "pw" })
	b:presence()
	local got = assert(b:wait_for(function(s) return s.name == "message" end, 3))
	lu.assertEquals(got.attr.id, "inst1")
	lu.assertNotNil(got:get_child("delay", "urn:xmpp:delay"))
	lu.assertStrContains(self.srv:log(), "Loaded offline_store.core from " .. lua_dir .. "/../../../lib/lua/5.4/offline_store/core.so")
	a:close(); b:close()
end
