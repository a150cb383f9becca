/* The XML of util.stanza trees, in C: core.serialize writes what the store keeps.
 * It works on the Lua tables util.stanza builds (name, attr, children at 1..n) and
 * never calls back into Lua, so a store makes no garbage but the result string. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "xml.h"

/* Deeper trees are left to util.stanza (serialize returns nil): C recursion is
 * bounded, and no real message nests this deep. */
#define MAX_DEPTH 256

/* A growing output buffer; `oom` sticks once an allocation failed. */
typedef struct {
	char *p;
	size_t n, cap;
	int oom;
} sbuf;

static void sb_add(sbuf *b, const char *s, size_t n) {
	if (b->oom)
		return;
	if (n > b->cap - b->n) {
		size_t cap = b->cap ? b->cap : 512;
		char *np;
		while (cap - b->n < n)
			cap *= 2;
		np = realloc(b->p, cap);
		if (!np) {
			b->oom = 1;
			return;
		}
		b->p = np, b->cap = cap;
	}
	memcpy(b->p + b->n, s, n);
	b->n += n;
}
#define SB_LIT(b, lit) sb_add((b), (lit), sizeof(lit) - 1)

/* Text and attribute values: the five characters util.stanza escapes. */
static void sb_escaped(sbuf *b, const char *s, size_t n) {
	size_t i, start = 0;
	for (i = 0; i < n; i++) {
		const char *rep;
		size_t rn;
		switch (s[i]) {
		case '\'': rep = "&apos;", rn = 6; break;
		case '"': rep = "&quot;", rn = 6; break;
		case '<': rep = "&lt;", rn = 4; break;
		case '>': rep = "&gt;", rn = 4; break;
		case '&': rep = "&amp;", rn = 5; break;
		default: continue;
		}
		sb_add(b, s + start, i - start);
		sb_add(b, rep, rn);
		start = i + 1;
	}
	sb_add(b, s + start, n - start);
}

/* The string at idx: a string, or a number as tostring would write it. Anything
 * else raises, as util.stanza's concatenation would. */
static const char *ser_str(lua_State *L, int idx, size_t *n, const char *what) {
	int t = lua_type(L, idx);
	if (t != LUA_TSTRING && t != LUA_TNUMBER)
		luaL_error(L, "serialize: %s is a %s", what, lua_typename(L, t));
	return lua_tolstring(L, idx, n); /* converts a copy on the stack, never a key */
}

static int field_is(lua_State *L, int tidx, const char *key, const char *want) {
	int r;
	lua_getfield(L, tidx, key);
	r = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), want) == 0;
	lua_pop(L, 1);
	return r;
}

/* <delay xmlns='urn:xmpp:delay'/> or <x xmlns='jabber:x:delay'/>. */
static int is_delay(lua_State *L, int el) {
	int r = 0;
	lua_getfield(L, el, "name");
	if (lua_type(L, -1) == LUA_TSTRING) {
		const char *name = lua_tostring(L, -1);
		if (lua_getfield(L, el, "attr") == LUA_TTABLE) {
			int attr = lua_gettop(L);
			if (strcmp(name, "delay") == 0)
				r = field_is(L, attr, "xmlns", "urn:xmpp:delay");
			else if (strcmp(name, "x") == 0)
				r = field_is(L, attr, "xmlns", "jabber:x:delay");
		}
		lua_pop(L, 1);
	}
	lua_pop(L, 1);
	return r;
}

static void ser_attr(sbuf *b, const char *k, size_t kn, const char *v, size_t vn) {
	SB_LIT(b, " ");
	sb_add(b, k, kn);
	SB_LIT(b, "='");
	sb_escaped(b, v, vn);
	SB_LIT(b, "'");
}

/* Serialises the element at stack index el, whose parent's xmlns is at index pns
 * (0 for the top). Returns 0, or -1 when the tree is deeper than MAX_DEPTH. */
static int ser_el(lua_State *L, sbuf *b, int el, int pns, int skip_delays, int depth) {
	size_t namelen, n, len, i;
	const char *name, *s;
	int nsid = 0, attr, myns;
	if (depth > MAX_DEPTH)
		return -1;
	luaL_checkstack(L, 8, "serialize");
	lua_getfield(L, el, "name");
	name = ser_str(L, -1, &namelen, "an element name");
	SB_LIT(b, "<");
	sb_add(b, name, namelen);
	if (lua_getfield(L, el, "attr") != LUA_TTABLE)
		luaL_error(L, "serialize: element <%s> has no attr table", name);
	attr = lua_gettop(L);
	lua_pushnil(L);
	while (lua_next(L, attr)) {
		const char *k, *v, *sep;
		size_t kn, vn;
		if (lua_type(L, -2) != LUA_TSTRING)
			luaL_error(L, "serialize: an attribute name of <%s> is not a string", name);
		k = lua_tolstring(L, -2, &kn);
		v = ser_str(L, -1, &vn, "an attribute value");
		sep = memchr(k, '\1', kn);
		if (sep) { /* "ns\1name": a namespaced attribute, declared in place */
			char num[24];
			size_t nl = (size_t)snprintf(num, sizeof num, "%d", ++nsid);
			SB_LIT(b, " xmlns:ns");
			sb_add(b, num, nl);
			SB_LIT(b, "='");
			sb_escaped(b, k, (size_t)(sep - k));
			SB_LIT(b, "' ns");
			sb_add(b, num, nl);
			SB_LIT(b, ":");
			sb_add(b, sep + 1, kn - (size_t)(sep - k) - 1);
			SB_LIT(b, "='");
			sb_escaped(b, v, vn);
			SB_LIT(b, "'");
		} else if (!(kn == 5 && memcmp(k, "xmlns", 5) == 0 && pns && lua_rawequal(L, -1, pns))) {
			ser_attr(b, k, kn, v, vn);
		}
		lua_pop(L, 1);
	}
	len = (size_t)lua_rawlen(L, el);
	if (len == 0) {
		SB_LIT(b, "/>");
	} else {
		SB_LIT(b, ">");
		lua_getfield(L, attr, "xmlns"); /* the children's parent namespace */
		myns = lua_gettop(L);
		for (i = 1; i <= len; i++) {
			if (lua_rawgeti(L, el, (lua_Integer)i) == LUA_TTABLE) {
				int child = lua_gettop(L);
				if (!(skip_delays && is_delay(L, child)) &&
				    ser_el(L, b, child, myns, 0, depth + 1) != 0)
					return -1;
			} else {
				s = ser_str(L, -1, &n, "a text node");
				sb_escaped(b, s, n);
			}
			lua_pop(L, 1);
		}
		lua_pop(L, 1); /* myns */
		SB_LIT(b, "</");
		sb_add(b, name, namelen);
		SB_LIT(b, ">");
	}
	lua_pop(L, 2); /* attr, name */
	return 0;
}

static int sbuf_gc(lua_State *L) {
	sbuf *b = lua_touserdata(L, 1);
	free(b->p);
	b->p = NULL;
	return 0;
}

/* core.serialize(stanza [, skip_delays]) -> string, or nil when deeper than MAX_DEPTH.
 * Byte for byte what tostring(stanza) gives. With skip_delays, the top element's
 * XEP-0203 and XEP-0091 delay children are left out (what a stored copy drops). */
int os_xml_serialize(lua_State *L) {
	sbuf *b;
	int skip = lua_toboolean(L, 2), rc;
	luaL_checktype(L, 1, LUA_TTABLE);
	lua_settop(L, 1);
	/* The buffer lives in a userdata, so an error on the way still frees it. */
	b = lua_newuserdatauv(L, sizeof *b, 0);
	memset(b, 0, sizeof *b);
	if (luaL_newmetatable(L, "offline_store.xmlbuf")) {
		lua_pushcfunction(L, sbuf_gc);
		lua_setfield(L, -2, "__gc");
	}
	lua_setmetatable(L, -2);
	rc = ser_el(L, b, 1, 0, skip, 0);
	if (b->oom)
		return luaL_error(L, "serialize: out of memory");
	if (rc != 0)
		lua_pushnil(L);
	else
		lua_pushlstring(L, b->p, b->n);
	free(b->p);
	b->p = NULL;
	return 1;
}
