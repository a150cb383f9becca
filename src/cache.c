/* offline_store.core.cache: a map from strings to integers that lives outside
 * the Lua heap, for what the plugin remembers per recipient (their limit).
 *
 * Why not a Lua table: a table of one entry per recipient keeps every key
 * string alive, and Prosody's collector, which never rests, marks and sweeps
 * each of them on every cycle. With 10,000 recipients that is 10,000 scattered
 * objects touched twice per cycle (every ~100 messages), which cost more than
 * the store itself (doc/performance.md). Here the collector sees
 * one userdata.
 *
 * Entries (the key's bytes inside) in the core's hash table (hash.h). The map
 * holds at most `capacity` keys: a new key past that starts it afresh (what is
 * remembered here can always be asked again). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "cache.h"
#include "hash.h"

#define CACHE_MT "offline_store.cache"
#define KEY_MAX 65535 /* bytes; a JID's node part is at most 1023 */

typedef struct {
	os_link link; /* first: a link is its entry */
	lua_Integer value;
	size_t len;
	char key[];
} entry;

typedef struct {
	os_table t;
	size_t capacity;
} cache;

typedef struct {
	const char *p;
	size_t n;
} key;

static int entry_is(const os_link *l, const void *arg) {
	const entry *e = (const entry *)l;
	const key *k = arg;
	return e->len == k->n && memcmp(e->key, k->p, k->n) == 0;
}

static cache *check_cache(lua_State *L) {
	return luaL_checkudata(L, 1, CACHE_MT);
}

static entry *find(cache *c, const key *k, uint64_t h) {
	return (entry *)os_table_find(&c->t, h, entry_is, k);
}

static void entry_free(os_link *e) {
	free(e);
}

static void forget_all(cache *c) {
	os_table_free(&c->t, entry_free);
}

/* cache:get(key) -> integer | nil */
static int l_get(lua_State *L) {
	cache *c = check_cache(L);
	key k;
	entry *e;
	k.p = luaL_checklstring(L, 2, &k.n);
	if (c->t.n == 0 || !(e = find(c, &k, os_hash(k.p, k.n))))
		return 0;
	lua_pushinteger(L, e->value);
	return 1;
}

/* cache:set(key, integer): remembers the value; past the capacity, the map
 * first forgets everything. */
static int l_set(lua_State *L) {
	cache *c = check_cache(L);
	key k;
	lua_Integer value;
	uint64_t h;
	entry *e;
	k.p = luaL_checklstring(L, 2, &k.n);
	value = luaL_checkinteger(L, 3);
	h = os_hash(k.p, k.n);
	if (c->t.n > 0 && (e = find(c, &k, h))) {
		e->value = value;
		return 0;
	}
	luaL_argcheck(L, k.n <= KEY_MAX, 2, "too long");
	if (c->t.n >= c->capacity)
		forget_all(c);
	if (c->t.n * 2 >= c->t.nbucket && os_table_grow(&c->t) != 0 && !c->t.bucket)
		return luaL_error(L, "not enough memory");
	if (!(e = malloc(sizeof *e + k.n)))
		return luaL_error(L, "not enough memory");
	e->link.hash = h, e->value = value, e->len = k.n;
	memcpy(e->key, k.p, k.n);
	os_table_add(&c->t, &e->link);
	return 0;
}

/* cache:clear() */
static int l_clear(lua_State *L) {
	forget_all(check_cache(L));
	return 0;
}

/* #cache: the number of keys held */
static int l_len(lua_State *L) {
	lua_pushinteger(L, (lua_Integer)check_cache(L)->t.n);
	return 1;
}

static int l_gc(lua_State *L) {
	forget_all(check_cache(L));
	return 0;
}

/* core.cache(capacity) -> cache */
int os_cache_new(lua_State *L) {
	lua_Integer capacity = luaL_checkinteger(L, 1);
	cache *c;
	luaL_argcheck(L, capacity >= 1 && capacity <= (1 << 24), 1, "must be between 1 and 16777216");
	c = lua_newuserdatauv(L, sizeof *c, 0);
	memset(c, 0, sizeof *c);
	c->capacity = (size_t)capacity;
	luaL_setmetatable(L, CACHE_MT);
	return 1;
}

static const luaL_Reg cache_methods[] = {
	{"get", l_get},
	{"set", l_set},
	{"clear", l_clear},
	{NULL, NULL},
};

void os_cache_register(lua_State *L) {
	if (luaL_newmetatable(L, CACHE_MT)) {
		lua_pushcfunction(L, l_gc);
		lua_setfield(L, -2, "__gc");
		lua_pushcfunction(L, l_len);
		lua_setfield(L, -2, "__len");
		luaL_newlib(L, cache_methods);
		lua_setfield(L, -2, "__index");
	}
	lua_pop(L, 1);
}
