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
 * Open addressing with linear probing; keys are copied back to back into one
 * arena. The map holds at most `capacity` keys: a new key past that starts it
 * afresh (what is remembered here can always be asked again). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "cache.h"
#include "hash.h"

#define CACHE_MT "offline_store.cache"
#define MIN_SLOTS 64
#define KEY_MAX 65535 /* bytes; a JID's node part is at most 1023 */

typedef struct {
	uint64_t hash; /* 0: an empty slot */
	lua_Integer value;
	uint32_t at, len; /* the key, in the arena */
} slot;

typedef struct {
	slot *slots;
	size_t n_slots, count, capacity;
	char *arena;
	size_t used, cap;
} cache;

/* (0 marks an empty slot) */
static uint64_t hash_of(const char *p, size_t n) {
	uint64_t h = os_hash(p, n);
	return h ? h : 1;
}

static cache *check_cache(lua_State *L) {
	return luaL_checkudata(L, 1, CACHE_MT);
}

/* The slot holding the key, or the empty slot where it would go. */
static slot *find(const cache *c, const char *key, size_t len, uint64_t h) {
	size_t mask = c->n_slots - 1, i = (size_t)h & mask;
	for (;;) {
		slot *s = &c->slots[i];
		if (s->hash == 0 ||
		    (s->hash == h && s->len == len && memcmp(c->arena + s->at, key, len) == 0))
			return s;
		i = (i + 1) & mask;
	}
}

static void forget_all(cache *c) {
	free(c->slots);
	free(c->arena);
	c->slots = NULL, c->arena = NULL;
	c->n_slots = c->count = c->used = c->cap = 0;
}

/* Doubles the slots (or makes the first ones); 0 when out of memory, the map
 * unchanged. */
static int grow(cache *c) {
	size_t n_old = c->n_slots, n = n_old ? n_old * 2 : MIN_SLOTS, i;
	slot *old = c->slots, *fresh = calloc(n, sizeof *fresh);
	if (!fresh)
		return 0;
	c->slots = fresh, c->n_slots = n;
	for (i = 0; i < n_old; i++)
		if (old[i].hash)
			*find(c, c->arena + old[i].at, old[i].len, old[i].hash) = old[i];
	free(old);
	return 1;
}

/* cache:get(key) -> integer | nil */
static int l_get(lua_State *L) {
	cache *c = check_cache(L);
	size_t len;
	const char *key = luaL_checklstring(L, 2, &len);
	slot *s;
	if (c->count == 0)
		return 0;
	s = find(c, key, len, hash_of(key, len));
	if (!s->hash)
		return 0;
	lua_pushinteger(L, s->value);
	return 1;
}

/* cache:set(key, integer): remembers the value; past the capacity, the map
 * first forgets everything. */
static int l_set(lua_State *L) {
	cache *c = check_cache(L);
	size_t len;
	const char *key = luaL_checklstring(L, 2, &len);
	lua_Integer value = luaL_checkinteger(L, 3);
	uint64_t h = hash_of(key, len);
	slot *s = c->count ? find(c, key, len, h) : NULL;
	if (s && s->hash) {
		s->value = value;
		return 0;
	}
	luaL_argcheck(L, len <= KEY_MAX, 2, "too long");
	if (c->count >= c->capacity || c->used + len > UINT32_MAX)
		forget_all(c);
	if ((c->count + 1) * 2 > c->n_slots && !grow(c))
		return luaL_error(L, "not enough memory");
	if (!c->arena || c->cap - c->used < len) { /* (made on the first key, even an empty one) */
		size_t cap = c->cap ? c->cap : 4096;
		char *grown;
		while (cap - c->used < len)
			cap *= 2;
		if (!(grown = realloc(c->arena, cap)))
			return luaL_error(L, "not enough memory");
		c->arena = grown, c->cap = cap;
	}
	memcpy(c->arena + c->used, key, len);
	s = find(c, key, len, h);
	s->hash = h, s->value = value, s->at = (uint32_t)c->used, s->len = (uint32_t)len;
	c->used += len;
	c->count++;
	return 0;
}

/* cache:clear() */
static int l_clear(lua_State *L) {
	forget_all(check_cache(L));
	return 0;
}

/* #cache: the number of keys held */
static int l_len(lua_State *L) {
	lua_pushinteger(L, (lua_Integer)check_cache(L)->count);
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
