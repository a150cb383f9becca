/* bench/e2e/lua_sym.c: a minimal stand-in for /usr/bin/lua5.4, linked statically against
 * Debian's liblua5.4.a, which keeps its symbol table, so that perf and callgrind can name
 * the interpreter's functions (Debian's lua5.4 binary is stripped). Runs a script with
 * arguments, as `lua5.4 script args...` does (arg table, generational GC as lua.c sets).
 * Built by bench/e2e.lua on demand for --perf / --callgrind. */
#include <stdio.h>
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>

static int traceback(lua_State *L) {
	const char *msg = lua_tostring(L, 1);
	luaL_traceback(L, L, msg ? msg : "(error object is not a string)", 1);
	return 1;
}

int main(int argc, char **argv) {
	if (argc < 2) { fprintf(stderr, "usage: %s script [args]\n", argv[0]); return 2; }
	lua_State *L = luaL_newstate();
	if (!L) return 1;
	luaL_openlibs(L);
	lua_gc(L, LUA_GCRESTART);
	lua_gc(L, LUA_GCGEN, 0, 0);
	lua_createtable(L, argc, 2);
	for (int i = 0; i < argc; i++) {
		lua_pushstring(L, argv[i]);
		lua_rawseti(L, -2, i - 1);
	}
	lua_setglobal(L, "arg");
	lua_pushcfunction(L, traceback);
	if (luaL_loadfile(L, argv[1]) != LUA_OK) {
		fprintf(stderr, "%s\n", lua_tostring(L, -1));
		return 1;
	}
	for (int i = 2; i < argc; i++) lua_pushstring(L, argv[i]);
	int rc = lua_pcall(L, argc - 2, 0, 1);
	if (rc != LUA_OK) fprintf(stderr, "%s\n", lua_tostring(L, -1));
	lua_close(L);
	return rc == LUA_OK ? 0 : 1;
}
