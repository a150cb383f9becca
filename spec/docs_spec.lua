-- The documentation against the code: every relative link in README.md and doc/*.md
-- leads to a file of the repository (and, with #anchor, to a heading there), every
-- option the plugin knows and every shell command is in the manual, and no text points
-- at documents that are not in the repository.

if not _RUNNER then package.path = "spec/?.lua;lua/?.lua;lua/?/init.lua;" .. package.path; package.cpath = "build/?.so;" .. package.cpath end
local lu = require "luaunit"
local support = require "support.util"

local ROOT = (arg and arg[0] or ""):match("^(.*)/spec/[^/]*$") or "."

local function read(path)
	local f = io.open(ROOT .. "/" .. path, "rb")
	if not f then return nil end
	local text = f:read("a")
	f:close()
	return text
end

local function doc_files()
	local files = { "README.md" }
	local p = io.popen("cd " .. support.quote(ROOT) .. " && ls doc/*.md")
	for line in p:lines() do files[#files + 1] = line end
	p:close()
	return files
end

-- GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
local function slug(heading)
	return (heading:lower():gsub("[^%w%- _]", ""):gsub(" ", "-"))
end

local function anchors(text)
	local set, in_code = {}, false
	for line in (text .. "\n"):gmatch("([^\n]*)\n") do
		if line:match("^```") then in_code = not in_code end
		local heading = not in_code and line:match("^#+%s+(.-)%s*$")
		if heading then set[slug(heading)] = true end
	end
	return set
end

local function dirname(path) return path:match("^(.*)/[^/]*$") or "." end

-- "a/b/../c" -> "a/c"
local function normalise(path)
	local parts = {}
	for part in path:gmatch("[^/]+") do
		if part == ".." then parts[#parts] = nil elseif part ~= "." then parts[#parts + 1] = part end
	end
	return table.concat(parts, "/")
end

TestDocs = {}

function TestDocs:test_relative_links_resolve()
	local checked = 0
	for _, file in ipairs(doc_files()) do
		local text = assert(read(file))
		for target in text:gmatch("%]%(([^)%s]+)%)") do
			if not target:match("^%a[%w+.-]*:") then -- not http:, mailto:, ...
				local path, anchor = target:match("^([^#]*)#?(.*)$")
				local resolved = path == "" and file or normalise(dirname(file) .. "/" .. path)
				local body = read(resolved)
				lu.assertNotNil(body, ("%s links to %s, which is not in the repository"):format(file, target))
				if anchor ~= "" then
					lu.assertTrue(anchors(body)[anchor] == true,
						("%s links to %s: %s has no heading with anchor #%s"):format(file, target, resolved, anchor))
				end
				checked = checked + 1
			end
		end
	end
	lu.assertTrue(checked > 20, "found too few links to be reading the files right")
end

function TestDocs:test_every_option_is_in_the_manual()
	local manual = assert(read("doc/manual.md"))
	local known = require "offline_store.options".KNOWN
	local n = 0
	for name in pairs(known) do
		lu.assertStrContains(manual, "| `" .. name .. "` |", false,
			("option %s is not in doc/manual.md's option table"):format(name))
		n = n + 1
	end
	lu.assertTrue(n >= 9)
	for _, name in ipairs { "access", "acl" } do lu.assertStrContains(manual, "`" .. name .. "`") end
end

function TestDocs:test_every_command_is_in_the_manual()
	local manual = assert(read("doc/manual.md"))
	for _, c in ipairs(require "offline_store.shell".COMMANDS) do
		local command = c[1]
		lu.assertStrContains(manual, "prosodyctl shell offline " .. command,
			false, ("shell command %s is not in doc/manual.md"):format(command))
		if command ~= "help" then
			lu.assertStrContains(manual, "prosodyctl mod_offline " .. command, false,
				("prosodyctl mod_offline %s is not in doc/manual.md"):format(command))
		end
	end
end

function TestDocs:test_no_references_to_documents_outside_the_repository()
	for _, file in ipairs(doc_files()) do
		lu.assertNil(assert(read(file)):find("SPEC §", 1, true), file .. " refers to SPEC §")
	end
end

function TestDocs:test_readme_is_short()
	local _, lines = assert(read("README.md")):gsub("\n", "")
	lu.assertTrue(lines <= 220, ("README.md has %d lines; the rest belongs in doc/"):format(lines))
end

if not _RUNNER then os.exit(lu.LuaUnit.run()) end
