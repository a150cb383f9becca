/* bench/e2e/cg.c: Lua bindings for callgrind's client requests, used by
 * mod_e2e_profile under bench/e2e.lua --callgrind PHASE (Prosody daemonises, so
 * callgrind_control cannot find it; the server toggles instrumentation itself).
 * Outside valgrind the requests are no-ops. */
#include <lua.h>
#include <lauxlib.h>
#include <valgrind/callgrind.h>

static int l_start(lua_State *L) {
	(void)L;
	CALLGRIND_ZERO_STATS;
	CALLGRIND_START_INSTRUMENTATION;
	return 0;
}

static int l_stop(lua_State *L) {
	const char *name = luaL_optstring(L, 1, "phase");
	CALLGRIND_STOP_INSTRUMENTATION;
	CALLGRIND_DUMP_STATS_AT(name);
	return 0;
}

static int l_running(lua_State *L) {
	lua_pushboolean(L, RUNNING_ON_VALGRIND ? 1 : 0);
	return 1;
}

int luaopen_e2e_cg(lua_State *L) {
	static const luaL_Reg f[] = { { "start", l_start }, { "stop", l_stop }, { "running", l_running }, { NULL, NULL } };
	luaL_newlib(L, f);
	return 1;
}
