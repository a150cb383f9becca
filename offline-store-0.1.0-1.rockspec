-- LuaRocks package: the C core, the Lua policy modules and the two Prosody plugins.
rockspec_format = "3.0"
package = "offline-store"
version = "0.1.0-1"
source = {
   url = "git+file:///offline-store",
}
description = {
   summary = "XEP-0160 offline-message store for Prosody with a C core",
   detailed = [[
A drop-in replacement for Prosody's bundled mod_offline: per-user limits through
access rules, a groupchat toggle, expiry, sqlite, memory and PostgreSQL backends, metrics.
The storage and limit primitives are a C Lua 5.4 extension (offline_store.core).]],
   license = "MIT",
   labels = { "xmpp", "prosody" },
}
dependencies = {
   "lua >= 5.4",
}
external_dependencies = {
   SQLITE = { header = "sqlite3.h", library = "sqlite3" },
   -- Debian's libpq-dev puts the header in include/postgresql/; both layouts are on incdirs.
   PQ = { header = "postgresql/libpq-fe.h", library = "pq" },
}
build = {
   type = "builtin",
   modules = {
      ["offline_store.core"] = {
         sources = { "src/core.c", "src/xml.c", "src/cache.c", "src/hash.c", "src/backend_sqlite.c", "src/backend_memory.c", "src/backend_postgres.c" },
         libraries = { "sqlite3", "pq" },
         incdirs = { "$(SQLITE_INCDIR)", "$(PQ_INCDIR)/postgresql", "$(PQ_INCDIR)" },
         libdirs = { "$(SQLITE_LIBDIR)", "$(PQ_LIBDIR)" },
      },
      offline_store = "lua/offline_store/init.lua",
      ["offline_store.policy"] = "lua/offline_store/policy.lua",
      ["offline_store.limits"] = "lua/offline_store/limits.lua",
      ["offline_store.admin"] = "lua/offline_store/admin.lua",
      ["offline_store.batch"] = "lua/offline_store/batch.lua",
      ["offline_store.command"] = "lua/offline_store/command.lua",
      ["offline_store.disabled"] = "lua/offline_store/disabled.lua",
      ["offline_store.drain"] = "lua/offline_store/drain.lua",
      ["offline_store.events"] = "lua/offline_store/events.lua",
      ["offline_store.group"] = "lua/offline_store/group.lua",
      ["offline_store.host"] = "lua/offline_store/host.lua",
      ["offline_store.loader"] = "lua/offline_store/loader.lua",
      ["offline_store.metrics"] = "lua/offline_store/metrics.lua",
      ["offline_store.options"] = "lua/offline_store/options.lua",
      ["offline_store.push"] = "lua/offline_store/push.lua",
      ["offline_store.ratelog"] = "lua/offline_store/ratelog.lua",
      ["offline_store.shell"] = "lua/offline_store/shell.lua",
      mod_offline = "lua/mod_offline.lua",
      mod_offline_stub = "lua/mod_offline_stub.lua",
   },
}
test = {
   type = "command",
   command = "make test",
}
