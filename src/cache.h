/* core.cache (cache.c): a map from strings to integers outside the Lua heap. */
#ifndef OFFLINE_STORE_CACHE_H
#define OFFLINE_STORE_CACHE_H

#include <lua.h>

#include "backend.h"

OS_HIDDEN int os_cache_new(lua_State *L);
/* Creates the cache metatable; called once when the core is loaded. */
OS_HIDDEN void os_cache_register(lua_State *L);

#endif
