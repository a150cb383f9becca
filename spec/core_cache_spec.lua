-- core.cache: the string -> integer map the plugin keeps recipients' limits in,
-- outside the Lua heap. Checked against a Lua table doing the same, and at its
-- edges (capacity, odd keys, bad arguments). Runs under the sanitizers and
-- valgrind with the other core specs.

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local core = require "offline_store.core"

TestCoreCache = {}

function TestCoreCache:test_get_set_and_overwrite()
	local c = core.cache(10)
	lu.assertNil(c:get("alice"))
	lu.assertEquals(#c, 0)
	c:set("alice", 100)
	c:set("bob", -1)
	c:set("carol", 0)
	lu.assertEquals({ c:get("alice"), c:get("bob"), c:get("carol"), #c }, { 100, -1, 0, 3 })
	lu.assertEquals(math.type(c:get("alice")), "integer")
	c:set("alice", 5000) -- a new value for a known key: still one entry
	lu.assertEquals({ c:get("alice"), #c }, { 5000, 3 })
	lu.assertNil(c:get("alic"))
	lu.assertNil(c:get("alicee"))
	c:set("", 7) -- the empty key is a key like any other
	lu.assertEquals({ c:get(""), #c }, { 7, 4 })
end

function TestCoreCache:test_the_empty_key_first()
	local c = core.cache(4)
	c:set("", 1) -- the very first key, before any key bytes exist
	lu.assertEquals({ c:get(""), #c }, { 1, 1 })
	c:clear()
	c:set("", 2) -- and again after a clear
	c:set("a", 3)
	lu.assertEquals({ c:get(""), c:get("a"), #c }, { 2, 3, 2 })
end

function TestCoreCache:test_keys_are_bytes()
	local c = core.cache(10)
	c:set("a\0b", 1)
	c:set("a\0c", 2)
	c:set("é", 3)
	lu.assertEquals({ c:get("a\0b"), c:get("a\0c"), c:get("a"), c:get("é") }, { 1, 2, nil, 3 })
	local long = ("x"):rep(65535)
	c:set(long, 9)
	lu.assertEquals(c:get(long), 9)
	lu.assertNil(c:get(long:sub(2)))
end

function TestCoreCache:test_past_its_capacity_it_starts_afresh()
	local c = core.cache(3)
	c:set("a", 1); c:set("b", 2); c:set("c", 3)
	lu.assertEquals(#c, 3)
	c:set("b", 20) -- a known key never forgets the others
	lu.assertEquals({ c:get("a"), c:get("b"), c:get("c"), #c }, { 1, 20, 3, 3 })
	c:set("d", 4) -- a fourth key: the three are forgotten, the new one kept
	lu.assertEquals({ c:get("a"), c:get("b"), c:get("c"), c:get("d"), #c }, { nil, nil, nil, 4, 1 })
end

function TestCoreCache:test_clear()
	local c = core.cache(100)
	for i = 1, 50 do c:set("u" .. i, i) end
	c:clear()
	lu.assertEquals(#c, 0)
	lu.assertNil(c:get("u1"))
	c:set("u1", 11) -- usable after a clear
	lu.assertEquals({ c:get("u1"), #c }, { 11, 1 })
	c:clear(); c:clear()
	lu.assertEquals(#c, 0)
end

-- Random keys (many colliding in their first bytes), sets and gets against a Lua
-- table, through growth of the slots and several restarts at the capacity.
function TestCoreCache:test_against_a_table()
	local seed = tonumber(os.getenv("SPEC_SEED") or "") or os.time()
	math.randomseed(seed)
	local capacity = 3000
	local c, model, n = core.cache(capacity), {}, 0
	for step = 1, 40000 do
		local key = ("user%d"):format(math.random(1, 4000))
		if math.random() < 0.05 then key = key .. "\0" .. math.random(1, 9) end
		if math.random() < 0.5 then
			local v = math.random(-1, 1 << 40)
			if model[key] == nil then
				if n >= capacity then model, n = {}, 0 end
				n = n + 1
			end
			model[key] = v
			c:set(key, v)
		else
			lu.assertEquals(c:get(key), model[key], ("seed %d, step %d, key %q"):format(seed, step, key))
		end
		if step % 997 == 0 then lu.assertEquals(#c, n, ("seed %d, step %d"):format(seed, step)) end
	end
	for key, v in pairs(model) do lu.assertEquals(c:get(key), v, ("seed %d, key %q"):format(seed, key)) end
end

function TestCoreCache:test_bad_arguments_raise_and_change_nothing()
	lu.assertErrorMsgContains("must be between 1 and 16777216", core.cache, 0)
	lu.assertErrorMsgContains("must be between 1 and 16777216", core.cache, 1 << 25)
	lu.assertErrorMsgContains("number expected", core.cache, "ten")
	local c = core.cache(10)
	c:set("a", 1)
	lu.assertErrorMsgContains("string expected", c.set, c, nil, 1)
	lu.assertErrorMsgContains("string expected", c.get, c, {})
	lu.assertErrorMsgContains("number expected", c.set, c, "b", nil)
	lu.assertErrorMsgContains("number has no integer representation", c.set, c, "b", 1.5)
	lu.assertErrorMsgContains("too long", c.set, c, ("x"):rep(65536), 1)
	lu.assertErrorMsgContains("offline_store.cache expected", c.get, {}, "a")
	lu.assertEquals({ c:get("a"), c:get("b"), #c }, { 1, nil, 1 })
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
