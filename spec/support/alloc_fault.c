/* alloc_fault.so: a test-only Lua module that makes the Lua state's allocator
 * refuse large blocks on demand, so a spec can have an emit callback of the
 * core raise "not enough memory" in the middle of a pop:
 *   local fail_over = package.loadlib("build/alloc_fault.so", "luaopen_alloc_fault")()
 *   fail_over(65536)  -- from now on, any block of more than 65536 bytes fails
 *   fail_over(nil)    -- back to normal */
#include <lauxlib.h>
#include <lua.h>

typedef struct {
	lua_Alloc orig;
	void *orig_ud;
	size_t over;
} state;

static void *refusing(void *ud, void *ptr, size_t osize, size_t nsize) {
	state *st = ud;
	if (nsize > st->over && (!ptr || nsize > osize))
		return NULL;
	return st->orig(st->orig_ud, ptr, osize, nsize);
}

/* fail_over(bytes | nil) */
static int fail_over(lua_State *L) {
	state *st = lua_touserdata(L, lua_upvalueindex(1));
	void *ud;
	lua_Alloc f = lua_getallocf(L, &ud);
	if (lua_isnoneornil(L, 1)) {
		if (f == refusing)
			lua_setallocf(L, st->orig, st->orig_ud);
		return 0;
	}
	st->over = (size_t)luaL_checkinteger(L, 1);
	if (f != refusing) {
		st->orig = f;
		st->orig_ud = ud;
		lua_setallocf(L, refusing, st);
	}
	return 0;
}

int luaopen_alloc_fault(lua_State *L);
int luaopen_alloc_fault(lua_State *L) {
	state *st = lua_newuserdatauv(L, sizeof *st, 0);
	st->orig = NULL;
	st->orig_ud = NULL;
	st->over = 0;
	/* the userdata stays reachable as the upvalue; kept in the registry as well,
	 * so that it outlives the function while the allocator points to it */
	lua_pushvalue(L, -1);
	luaL_ref(L, LUA_REGISTRYINDEX);
	lua_pushcclosure(L, fail_over, 1);
	return 1;
}
