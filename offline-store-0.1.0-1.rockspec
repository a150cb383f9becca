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
}
-- The Makefile builds the core (and installs it with every Lua module of lua/offline_store/ and the
-- two plugins). The postgres backend is built when libpq's headers are found (pkg-config libpq,
-- else pg_config); POSTGRES=no in the environment builds without it, POSTGRES=yes insists.
build = {
   type = "make",
   build_variables = {
      CFLAGS = "$(CFLAGS)",
      LIBFLAG = "$(LIBFLAG)",
      LUA = "$(LUA)",
      LUA_INCDIR = "$(LUA_INCDIR)",
      SQLITE_CFLAGS = "-I$(SQLITE_INCDIR)",
      SQLITE_LIBS = "-L$(SQLITE_LIBDIR) -lsqlite3",
   },
   install_variables = {
      PREFIX = "$(PREFIX)",
      LIBDIR = "$(LIBDIR)",
      LUADIR = "$(LUADIR)",
      SQLITE_CFLAGS = "-I$(SQLITE_INCDIR)",
      SQLITE_LIBS = "-L$(SQLITE_LIBDIR) -lsqlite3",
   },
}
test = {
   type = "command",
   command = "make test",
}
