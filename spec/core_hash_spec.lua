-- The hash behind the core's tables (the memory backend's queues, the sqlite counter cache,
-- core.cache) is keyed per process, so that names chosen to collide do not: SipHash-2-4
-- checked against published values, a key that differs between processes, and 50,000 valid
-- usernames that all share the low 24 bits of FNV-1a (the old, unkeyed hash) spread over the
-- tables' buckets as random names would. core._hash is internal, for this spec.
-- The cost of such names in the tables themselves is measured by `make bench-hash`.

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local support = require "support.util"
local collide = require "support.collide"
local core = require "offline_store.core"

local HOST = "example.test"
local N = 50000

-- The bytes 0, 1, ..., n - 1.
local function counting(n)
	local t = {}
	for i = 1, n do t[i] = string.char(i - 1) end
	return table.concat(t)
end

-- The largest number of hashes that share a bucket of a table of 2^bits buckets.
local function max_bucket(hashes, bits)
	local mask, count, max = (1 << bits) - 1, {}, 0
	for _, h in ipairs(hashes) do
		local b = h & mask
		count[b] = (count[b] or 0) + 1
		if count[b] > max then max = count[b] end
	end
	return max
end

TestCoreHash = {}

-- The reference vectors of SipHash-2-4: key 00 01 .. 0f, message 00 01 .. (n - 1).
function TestCoreHash:test_siphash_2_4_published_values()
	local key = counting(16)
	local expected = {
		[0] = 0x726fdb47dd0e0e31, [1] = 0x74f839c593dc67fd, [2] = 0x0d6c8009d9a94f5a,
		[7] = 0xab0200f58b01d137, [8] = 0x93f5f5799a932462, [15] = 0xa129ca6149be45e5,
		[63] = 0x958a324ceb064572,
	}
	for n, h in pairs(expected) do
		lu.assertEquals(core._hash(counting(n), nil, key), h, "length " .. n)
	end
end

-- A queue's key is host, 0xff, user, however the bytes fall across SipHash's 8-byte words,
-- short (hashed joined) or long (hashed as it comes).
function TestCoreHash:test_a_queue_key_is_host_ff_user()
	local key = ("k"):rep(16)
	for _, s in ipairs({ counting(40), counting(200) .. counting(100) }) do
		s = s:gsub("\255", "")
		for cut = 0, #s do
			local host, user = s:sub(1, cut), s:sub(cut + 1)
			lu.assertEquals(core._hash(host, user), core._hash(host .. "\255" .. user), cut)
			lu.assertEquals(core._hash(host, user, key), core._hash(host .. "\255" .. user, nil, key), cut)
		end
	end
	lu.assertEquals(core._hash(HOST, "alice"), core._hash(HOST, "alice"), "stable within a process")
	lu.assertErrorMsgContains("must be 16 bytes", core._hash, "a", nil, "short")
end

-- Each process draws its own key: the same names hash differently in another process.
function TestCoreHash:test_the_key_differs_per_process()
	local mine = ("%d %d"):format(core._hash(HOST, "alice"), core._hash("alice@" .. HOST))
	local seen = { [mine] = true }
	for _ = 1, 2 do
		-- the child loads the same core build, so it needs the same preloaded runtime (test-asan)
		local ok, out = support.sh("env LD_PRELOAD=" .. support.quote(os.getenv("LD_PRELOAD") or "")
			.. " lua5.4 -e " .. support.quote(([[
				package.cpath = %q
				local core = require "offline_store.core"
				io.write(("%%d %%d"):format(core._hash(%q, "alice"), core._hash("alice@" .. %q)))
			]]):format(package.cpath, HOST, HOST)))
		lu.assertTrue(ok, out)
		lu.assertStrMatches(out, "%-?%d+ %-?%d+")
		lu.assertNil(seen[out], "another process, another key")
		seen[out] = true
	end
end

-- 50,000 names that all fall in one bucket of the old FNV-1a tables (the memory backend's
-- 65,536 buckets at this size, the counter cache's 4,096, core.cache's 131,072 slots) spread
-- over the buckets like random keys: with a mean of 0.76 keys a bucket the fullest holds at
-- most 12 (random keys exceed that with a probability near 3e-6), with a mean of 12.2 at most
-- 40 (near 1e-6).
function TestCoreHash:test_names_made_to_collide_under_fnv_do_not_collide()
	local queue_names = collide.names(HOST .. "\255", N, 24)
	local cache_names = collide.names("", N, 24) -- core.cache's keys are user@host
	local fnv_queue, fnv_cache, queue, cache = {}, {}, {}, {}
	for i = 1, N do
		fnv_queue[i] = collide.fnv(HOST .. "\255" .. queue_names[i])
		fnv_cache[i] = collide.fnv(cache_names[i] .. "@" .. HOST)
		queue[i] = core._hash(HOST, queue_names[i])
		cache[i] = core._hash(cache_names[i] .. "@" .. HOST)
	end
	-- the names are what an attacker would send against the old hash
	lu.assertEquals(max_bucket(fnv_queue, 24), N)
	lu.assertEquals(max_bucket(fnv_cache, 24), N)
	lu.assertTrue(queue_names[1]:match("^[a-z0-9]+$") and #queue_names[1] <= 64, queue_names[1])
	-- and the tables' hash spreads them
	lu.assertTrue(max_bucket(queue, 16) <= 12, "memory backend: " .. max_bucket(queue, 16))
	lu.assertTrue(max_bucket(queue, 12) <= 40, "counter cache: " .. max_bucket(queue, 12))
	lu.assertTrue(max_bucket(cache, 17) <= 12, "core.cache: " .. max_bucket(cache, 17))
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
