-- Names that an attacker would pick against an unkeyed FNV-1a table (the core's tables
-- before they were keyed): valid usernames, all equal in the low bits of FNV-1a.
-- Used by spec/core_hash_spec.lua and bench/hash_flood.lua.
--
-- FNV-1a's low k bits after a byte depend only on the low k bits before it (xor, then a
-- multiplication modulo 2^64), so two 4-character blocks that take one k-bit state to the
-- same next state are found by a birthday search over the blocks; n such pairs in
-- a row make 2^n names that share the state, whatever follows them.

local M = {}

local START, PRIME = 0xcbf29ce484222325, 0x100000001b3
local ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
-- Characters per block: with 3, the low 24 bits of FNV-1a's state are too regular for
-- two of the 46,656 blocks to meet; with 4, about 56,000 of 1.7 million are tried.
local BLOCK = 4

-- FNV-1a (64-bit) of s, from state h (default: the start); Lua's integers wrap like C's.
function M.fnv(s, h)
	h = h or START
	for i = 1, #s do h = (h ~ s:byte(i)) * PRIME end
	return h
end

-- Two blocks of len characters taking the low bits (mask) of state h to one state, and
-- that state; nil when there are none.
local function block_pair(h, mask, len)
	local seen = {}
	local function walk(state, block)
		if #block == len then
			if seen[state] then return seen[state], block, state end
			seen[state] = block
			return nil
		end
		for i = 1, #ALPHABET do
			local a, b, t = walk(((state ~ ALPHABET:byte(i)) * PRIME) & mask, block .. ALPHABET:sub(i, i))
			if a then return a, b, t end
		end
	end
	return walk(h, "")
end

-- count distinct names n such that FNV-1a(prefix .. n .. any suffix) has the same low
-- `bits` bits (at most 24). For the backends' queue keys the prefix is host .. "\xff".
function M.names(prefix, count, bits)
	local mask = (1 << bits) - 1
	local h, blocks = M.fnv(prefix) & mask, {}
	while (1 << #blocks) < count do
		local a, b, t = block_pair(h, mask, BLOCK)
		assert(a, "no two blocks collide")
		blocks[#blocks + 1], h = { a, b }, t
	end
	local names, parts = {}, {}
	for i = 0, count - 1 do
		for j = 1, #blocks do parts[j] = blocks[j][((i >> (j - 1)) & 1) + 1] end
		names[i + 1] = table.concat(parts)
	end
	return names
end

-- count random names of len characters (M.names' are 4 per block: 64 for 50,000).
function M.random_names(count, len)
	local names, chars = {}, {}
	for i = 1, count do
		for j = 1, len do
			local c = math.random(#ALPHABET)
			chars[j] = ALPHABET:sub(c, c)
		end
		names[i] = table.concat(chars)
	end
	return names
end

return M
