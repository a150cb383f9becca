/* The XML of util.stanza trees, in C: core.serialize writes what the store keeps.
 * It works on the Lua tables util.stanza builds (name, attr, children at 1..n);
 * Lua code runs only through their metamethods and finalizers (see take_buf).
 * It writes into one buffer kept per Lua state, so
 * db:store given a stanza (core.c) makes no garbage at all, and core.serialize
 * only the result string. */
#define _POSIX_C_SOURCE 200809L /* gmtime_r */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>

#include "buffer.h"
#include "xml.h"

/* Deeper trees are left to util.stanza (serialize returns nil): C recursion is
 * bounded, and no real message nests this deep. */
#define MAX_DEPTH 256

typedef os_buf sbuf; /* (buffer.h; oom sticks once an allocation failed) */

static inline void sb_add(sbuf *b, const char *s, size_t n) {
	os_buf_add(b, s, n);
}
#define SB_LIT(b, lit) sb_add((b), (lit), sizeof(lit) - 1)

/* Text and attribute values: the five characters util.stanza escapes. s is a
 * Lua string or a prefix of one, so a NUL follows it somewhere: strcspn (which
 * glibc does 16 bytes at a step) finds the next character to escape, and an
 * embedded NUL, which needs none, is stepped over. */
static void sb_escaped(sbuf *b, const char *s, size_t n) {
	size_t i = 0, start = 0;
	for (;;) {
		const char *rep;
		size_t rn;
		i += strcspn(s + i, "'\"<>&");
		if (i >= n)
			break;
		switch (s[i]) {
		case '\'': rep = "&apos;", rn = 6; break;
		case '"': rep = "&quot;", rn = 6; break;
		case '<': rep = "&lt;", rn = 4; break;
		case '>': rep = "&gt;", rn = 4; break;
		case '&': rep = "&amp;", rn = 5; break;
		default: i++; continue; /* an embedded NUL */
		}
		sb_add(b, s + start, i - start);
		sb_add(b, rep, rn);
		start = ++i;
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
		int same_ns;
		if (lua_type(L, -2) != LUA_TSTRING)
			luaL_error(L, "serialize: an attribute name of <%s> is not a string", name);
		k = lua_tolstring(L, -2, &kn);
		/* (compared before ser_str turns a number into a string on the stack) */
		same_ns = pns && kn == 5 && memcmp(k, "xmlns", 5) == 0 && lua_rawequal(L, -1, pns);
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
		} else if (!same_ns) {
			ser_attr(b, k, kn, v, vn);
		}
		lua_pop(L, 1);
	}
	len = (size_t)lua_rawlen(L, el);
	if (len == 0) {
		SB_LIT(b, "/>");
	} else {
		size_t open_at = b->n, written = 0;
		SB_LIT(b, ">");
		lua_getfield(L, attr, "xmlns"); /* the children's parent namespace */
		myns = lua_gettop(L);
		for (i = 1; i <= len; i++) {
			if (lua_rawgeti(L, el, (lua_Integer)i) == LUA_TTABLE) {
				int child = lua_gettop(L);
				if (!(skip_delays && is_delay(L, child))) {
					if (ser_el(L, b, child, myns, 0, depth + 1) != 0)
						return -1;
					written++;
				}
			} else {
				s = ser_str(L, -1, &n, "a text node");
				sb_escaped(b, s, n);
				written++;
			}
			lua_pop(L, 1);
		}
		lua_pop(L, 1); /* myns */
		if (written == 0) { /* only delays, left out: tostring of a copy without them */
			b->n = open_at;
			SB_LIT(b, "/>");
		} else {
			SB_LIT(b, "</");
			sb_add(b, name, namelen);
			SB_LIT(b, ">");
		}
	}
	lua_pop(L, 2); /* attr, name */
	return 0;
}

static int sbuf_gc(lua_State *L) {
	os_buf_free(lua_touserdata(L, 1));
	return 0;
}

/* A buffer grown past this by a big stanza is given back at the next call. */
#define KEEP_BUFFER 65536

static const char buf_key = 0; /* its address keys the buffer in the registry */

/* One output buffer per Lua state, kept between calls: serializing allocates
 * nothing once the buffer has grown to the stanza's size. A userdata in the
 * registry, so the state frees it when it closes. A call takes it out of the
 * registry (onto the stack) while it writes and puts it back when done: Lua code
 * that runs meanwhile (a metamethod, a finalizer) and serializes again finds none
 * and makes its own, instead of writing into the one being filled. (If the call
 * raises, its buffer is not put back and is collected.) */
static sbuf *take_buf(lua_State *L) {
	sbuf *b;
	if (lua_rawgetp(L, LUA_REGISTRYINDEX, &buf_key) == LUA_TUSERDATA) {
		b = lua_touserdata(L, -1);
		lua_pushnil(L);
		lua_rawsetp(L, LUA_REGISTRYINDEX, &buf_key);
		return b;
	}
	lua_pop(L, 1);
	b = lua_newuserdatauv(L, sizeof *b, 0);
	memset(b, 0, sizeof *b);
	lua_createtable(L, 0, 1);
	lua_pushcfunction(L, sbuf_gc);
	lua_setfield(L, -2, "__gc");
	lua_setmetatable(L, -2);
	return b;
}

int os_xml_write(lua_State *L, int idx, int skip_delays, const char **p, size_t *n) {
	int top = lua_gettop(L), rc;
	sbuf *b = take_buf(L);
	os_buf_reset(b, KEEP_BUFFER); /* (the memory of a big stanza last time goes back) */
	rc = ser_el(L, b, lua_absindex(L, idx), 0, skip_delays, 0);
	lua_pushvalue(L, top + 1);
	lua_rawsetp(L, LUA_REGISTRYINDEX, &buf_key); /* back, for the next call */
	lua_settop(L, top);
	if (b->oom)
		return luaL_error(L, "serialize: out of memory");
	*p = b->p ? b->p : "";
	*n = b->n;
	return rc;
}

/* core.serialize(stanza [, skip_delays]) -> string, or nil when deeper than MAX_DEPTH.
 * Byte for byte what tostring(stanza) gives. With skip_delays, the top element's
 * XEP-0203 and XEP-0091 delay children are left out (what a stored copy drops). */
int os_xml_serialize(lua_State *L) {
	const char *p;
	size_t n;
	luaL_checktype(L, 1, LUA_TTABLE);
	if (os_xml_write(L, 1, lua_toboolean(L, 2), &p, &n) != 0)
		lua_pushnil(L);
	else
		lua_pushlstring(L, p, n);
	return 1;
}

/* ---- core.parse: the XML core.serialize writes, read back into util.stanza trees ----
 *
 * Deliveries used util.xml.parse (a fresh expat parser and a Lua callback per event)
 * for every stored row. The rows are written by os_xml_serialize above, so they use a
 * small subset of XML: <name a='v'>, single quotes, single spaces between attributes,
 * the five predefined entities, xmlns only where it changes, no declaration, comment,
 * CDATA or whitespace around the element. os_xml_parse reads exactly that subset and
 * returns nil for anything else, so the caller falls back to util.xml.parse, which
 * reads the rest and gives the error message for broken XML. Where both accept an
 * input they give the same tree (tested against each other in spec/xml_spec.lua),
 * down to the order pairs() walks the attr tables (see attr_finish). Expat may cut
 * a text run into several nodes where this gives one; tostring and get_text see no
 * difference. util.xml's per-element `namespaces` table (prefix -> URI, always empty
 * here, as prefixes are refused) is not made: nothing reads it but st.clone, and
 * stanzas from the network do not have it either.
 *
 * The input comes from the database, so it is treated as hostile: every read is
 * bounds-checked against the end, the tables are built as it goes (nothing is
 * allocated outside Lua, so an out-of-memory error leaks nothing) and nesting is
 * bounded by MAX_DEPTH, like the serializer's. */

#define NS_XML "http://www.w3.org/XML/1998/namespace"
#define NS_XMLNS "http://www.w3.org/2000/xmlns/"

typedef struct {
	lua_State *L;
	const unsigned char *p, *end; /* the next byte to read; the end of the input */
} reader;

/* Names: only the ASCII part of XML's, [A-Za-z_][A-Za-z0-9._-]*; no ':' (prefixes
 * other than xml: on attributes are refused). */
static int is_name_start(unsigned char c) {
	return ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') || c == '_';
}

static int is_name_char(unsigned char c) {
	return is_name_start(c) || (c >= '0' && c <= '9') || c == '-' || c == '.';
}

/* The length of the name at p, 0 if there is none. */
static size_t name_len(const unsigned char *p, const unsigned char *end) {
	const unsigned char *q = p;
	if (q == end || !is_name_start(*q))
		return 0;
	for (q++; q < end && is_name_char(*q); q++)
		;
	return (size_t)(q - p);
}

static int cont(unsigned char c) {
	return (c & 0xC0) == 0x80;
}

/* The length of the UTF-8 sequence at p (whose first byte is >= 0x80) when it is
 * well-formed (no overlong form, no surrogate, at most U+10FFFF) and an XML 1.0
 * Char (not U+FFFE or U+FFFF); else 0. */
static size_t utf8_len(const unsigned char *p, const unsigned char *end) {
	size_t left = (size_t)(end - p);
	unsigned char c = p[0];
	if (c >= 0xC2 && c <= 0xDF)
		return left >= 2 && cont(p[1]) ? 2 : 0;
	if (c >= 0xE0 && c <= 0xEF) {
		if (left < 3 || !cont(p[1]) || !cont(p[2]))
			return 0;
		if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] >= 0xA0) ||
		    (c == 0xEF && p[1] == 0xBF && p[2] >= 0xBE))
			return 0;
		return 3;
	}
	if (c >= 0xF0 && c <= 0xF4) {
		if (left < 4 || !cont(p[1]) || !cont(p[2]) || !cont(p[3]))
			return 0;
		if ((c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] >= 0x90))
			return 0;
		return 4;
	}
	return 0;
}

/* The entity at p ('&'): one of the five the serializer writes. Returns its
 * length and sets *c to the character it stands for; 0 for anything else
 * (character references, other names, a missing ';'). */
static size_t entity_len(const unsigned char *p, const unsigned char *end, char *c) {
	static const struct {
		const char *s;
		size_t n;
		char c;
	} ents[] = {
		{"&lt;", 4, '<'}, {"&gt;", 4, '>'}, {"&amp;", 5, '&'}, {"&apos;", 6, '\''}, {"&quot;", 6, '"'},
	};
	size_t i, left = (size_t)(end - p);
	for (i = 0; i < sizeof ents / sizeof ents[0]; i++) {
		if (left >= ents[i].n && memcmp(p, ents[i].s, ents[i].n) == 0) {
			*c = ents[i].c;
			return ents[i].n;
		}
	}
	return 0;
}

/* Reads character data up to the byte `stop` ('<' for text, '\'' for an attribute
 * value), which must come before the end, and pushes it unescaped; r->p is left on
 * `stop`. Returns 0 for anything outside the subset: a raw '<' or '>' (never written
 * raw; refusing '>' also refuses "]]>", which XML forbids in text), any '&' but the
 * five entities, invalid UTF-8, control characters, and CR anywhere or tab and
 * newline in attribute values: expat rewrites those (CR LF to LF, and to spaces in
 * attribute values), so rather than copy its rules they go to util.xml. */
static int push_chars(reader *r, unsigned char stop, int in_attr) {
	const unsigned char *start = r->p, *q = r->p;
	int escaped = 0;
	char c;
	while (q < r->end && *q != stop) {
		unsigned char b = *q;
		size_t n = 1;
		if (b >= 0x80)
			n = utf8_len(q, r->end);
		else if (b == '&')
			n = entity_len(q, r->end, &c), escaped = 1;
		else if (b < 0x20 ? in_attr || (b != '\t' && b != '\n') : b == '<' || b == '>')
			n = 0;
		if (n == 0)
			return 0;
		q += n;
	}
	if (q == r->end)
		return 0;
	r->p = q;
	if (!escaped) {
		lua_pushlstring(r->L, (const char *)start, (size_t)(q - start));
	} else { /* unescaped, it can only be shorter */
		luaL_Buffer b;
		size_t len = (size_t)(q - start), out = 0, i = 0;
		char *dst = luaL_buffinitsize(r->L, &b, len);
		while (i < len) {
			if (start[i] == '&') {
				i += entity_len(start + i, q, &dst[out++]);
			} else {
				dst[out++] = (char)start[i++];
			}
		}
		luaL_pushresultsize(&b, out);
	}
	return 1;
}

/* Reads "='value'" after an attribute name and pushes the value. */
static int push_value(reader *r) {
	if (r->end - r->p < 2 || r->p[0] != '=' || r->p[1] != '\'')
		return 0;
	r->p += 2;
	if (!push_chars(r, '\'', 1))
		return 0;
	r->p++; /* the closing quote */
	return 1;
}

/* Reads the attributes of a start tag, each " name='value'", into the table at
 * index attr, built as lxp builds the one it passes util.xml: attr[i] = name,
 * then attr[name] = value, in document order. An xml:NAME attribute goes under
 * the name expat gives it, NS_XML "\1" NAME. An xmlns attribute is a namespace
 * declaration, not an attribute: its value is left on the stack and *ns set to its
 * index. Sets *count to the number of attributes. Returns 0 for a prefix other
 * than xml:, a duplicate, a reserved namespace (expat refuses them) or a bad value. */
static int read_attrs(reader *r, int attr, int *ns, lua_Integer *count) {
	lua_State *L = r->L;
	lua_Integer n = 0;
	*ns = 0;
	while (r->p < r->end && *r->p == ' ') {
		const unsigned char *k = ++r->p;
		size_t kn = name_len(k, r->end), ln;
		r->p += kn;
		if (kn == 0)
			return 0;
		if (r->p < r->end && *r->p == ':') {
			if (!(kn == 3 && memcmp(k, "xml", 3) == 0) || (ln = name_len(r->p + 1, r->end)) == 0)
				return 0;
			lua_pushliteral(L, NS_XML "\1");
			lua_pushlstring(L, (const char *)r->p + 1, ln);
			lua_concat(L, 2);
			r->p += 1 + ln;
		} else if (kn == 5 && memcmp(k, "xmlns", 5) == 0) {
			const char *uri;
			if (*ns || !push_value(r))
				return 0;
			uri = lua_tostring(L, -1);
			if (strcmp(uri, NS_XML) == 0 || strcmp(uri, NS_XMLNS) == 0)
				return 0;
			*ns = lua_gettop(L);
			continue;
		} else {
			lua_pushlstring(L, (const char *)k, kn);
		}
		lua_pushvalue(L, -1);
		if (lua_rawget(L, attr) != LUA_TNIL)
			return 0; /* a duplicate */
		lua_pop(L, 1);
		lua_pushvalue(L, -1);
		lua_rawseti(L, attr, ++n);
		if (!push_value(r))
			return 0;
		lua_rawset(L, attr);
	}
	*count = n;
	return 1;
}

/* Finishes the attr table as util.xml's StartElement does, step by step: xmlns set
 * to the element's namespace when it has one (inherited or declared), the indices
 * cleared, and the xml: names renamed from NS_XML "\1" NAME to "xml:NAME". The same
 * operations in the same order leave the table in the same internal layout, so
 * pairs() walks it in the same order and tostring() writes the same bytes as for
 * util.xml's tree; a table filled in any other way would often list the attributes
 * in another order. */
static void attr_finish(lua_State *L, int attr, int ns, lua_Integer count) {
	lua_Integer i;
	if (ns && lua_rawlen(L, ns) > 0) {
		lua_pushvalue(L, ns);
		lua_setfield(L, attr, "xmlns");
	}
	for (i = 1; i <= count; i++) {
		size_t kn;
		const char *k, *sep;
		lua_rawgeti(L, attr, i);
		lua_pushnil(L);
		lua_rawseti(L, attr, i);
		k = lua_tolstring(L, -1, &kn);
		sep = memchr(k, '\1', kn);
		if (sep) {
			lua_pushliteral(L, "xml:");
			lua_pushlstring(L, sep + 1, kn - (size_t)(sep - k) - 1);
			lua_concat(L, 2);
			lua_pushvalue(L, -2);
			lua_rawget(L, attr);
			lua_rawset(L, attr); /* attr["xml:NAME"] = attr[k] */
			lua_pushnil(L);
			lua_rawset(L, attr); /* attr[k] = nil, popping k */
		} else {
			lua_pop(L, 1);
		}
	}
}

static int read_element(reader *r, int pns, int depth);

/* Reads the children of the element at index el up to and including its end tag,
 * which must be exactly </name>. Children go to el[1..n], elements also to the
 * tags table at index tags; ns is the index of the element's namespace (0: none). */
static int read_content(reader *r, int el, int tags, const unsigned char *name, size_t namelen, int ns,
                        int depth) {
	lua_State *L = r->L;
	lua_Integer n = 0, ntags = 0;
	while (r->p < r->end) {
		if (*r->p != '<') {
			if (!push_chars(r, '<', 0))
				return 0;
			lua_rawseti(L, el, ++n);
		} else if (r->end - r->p >= 2 && r->p[1] == '/') {
			r->p += 2;
			if ((size_t)(r->end - r->p) < namelen + 1 || memcmp(r->p, name, namelen) != 0 ||
			    r->p[namelen] != '>')
				return 0;
			r->p += namelen + 1;
			return 1;
		} else {
			if (!read_element(r, ns, depth + 1))
				return 0;
			lua_pushvalue(L, -1);
			lua_rawseti(L, tags, ++ntags);
			lua_rawseti(L, el, ++n);
		}
	}
	return 0; /* the input ends inside the element */
}

/* Reads the element at r->p and pushes it: { name =, attr =, tags =, children at
 * 1..n } with the metatable at index 2. pns is the index of the parent's namespace
 * (0: none). On failure returns 0, leaving the stack to the caller to drop. */
static int read_element(reader *r, int pns, int depth) {
	lua_State *L = r->L;
	const unsigned char *name;
	size_t namelen;
	int el, attr, tags, ns;
	lua_Integer count;
	if (depth > MAX_DEPTH || r->p == r->end || *r->p != '<')
		return 0;
	name = ++r->p;
	namelen = name_len(name, r->end);
	if (namelen == 0) /* also "<!" (comment, CDATA, DOCTYPE) and "<?" */
		return 0;
	r->p += namelen;
	luaL_checkstack(L, 12, "parse");
	lua_createtable(L, 0, 3);
	el = lua_gettop(L);
	lua_pushlstring(L, (const char *)name, namelen);
	lua_setfield(L, el, "name");
	lua_newtable(L); /* empty, as lxp's (see attr_finish) */
	attr = lua_gettop(L);
	if (!read_attrs(r, attr, &ns, &count))
		return 0;
	attr_finish(L, attr, ns ? ns : pns, count);
	lua_pushvalue(L, attr);
	lua_setfield(L, el, "attr");
	lua_newtable(L);
	tags = lua_gettop(L);
	lua_pushvalue(L, tags);
	lua_setfield(L, el, "tags");
	if (r->end - r->p >= 2 && r->p[0] == '/' && r->p[1] == '>') {
		r->p += 2;
	} else if (r->p < r->end && *r->p == '>') {
		r->p++;
		if (!read_content(r, el, tags, name, namelen, ns ? ns : pns, depth))
			return 0;
	} else {
		return 0;
	}
	lua_pushvalue(L, 2);
	lua_setmetatable(L, el);
	lua_settop(L, el);
	return 1;
}

/* core.parse(xml, stanza_mt) -> the util.stanza tree util.xml.parse(xml) gives, or
 * nil when xml is outside the subset core.serialize writes (then util.xml.parse
 * reads it, or says why it cannot). Raises only for bad arguments or out of memory. */
int os_xml_parse(lua_State *L) {
	size_t len;
	const char *xml = luaL_checklstring(L, 1, &len);
	reader r;
	luaL_checktype(L, 2, LUA_TTABLE);
	lua_settop(L, 2);
	r.L = L;
	r.p = (const unsigned char *)xml;
	r.end = r.p + len;
	if (!read_element(&r, 0, 0) || r.p != r.end)
		lua_pushnil(L); /* the stack above 2 is dropped on return */
	return 1;
}

/* Whether s is text util.stanza would take (check_text): well-formed UTF-8 XML
 * characters, no control character but tab, LF and CR. */
static int valid_text(const unsigned char *s, size_t n) {
	const unsigned char *end = s + n;
	while (s < end) {
		if (*s >= 0x80) {
			size_t k = utf8_len(s, end);
			if (k == 0)
				return 0;
			s += k;
		} else if (*s < 0x20 && *s != '\t' && *s != '\n' && *s != '\r') {
			return 0;
		} else {
			s++;
		}
	}
	return 1;
}

static void check_text_arg(lua_State *L, int arg) {
	size_t n;
	const char *s = luaL_checklstring(L, arg, &n);
	if (!valid_text((const unsigned char *)s, n))
		luaL_argerror(L, arg, "not XML text (control character or invalid UTF-8)");
}

/* core.delay(stanza, from, seconds, text) -> stanza, with a last child
 * <delay xmlns='urn:xmpp:delay' from=from stamp=seconds as XEP-0082>text</delay>:
 * the element stanza:tag("delay", { xmlns =, from =, stamp = }):text(text):up()
 * adds, built as util.stanza builds it (the attr table filled in the same order,
 * so tostring writes the same bytes), without util.stanza's checks and garbage
 * on every delivered message. */
int os_xml_delay(lua_State *L) {
	lua_Integer secs = luaL_checkinteger(L, 3);
	time_t t = (time_t)secs;
	struct tm tm;
	char stamp[64];
	int mt, tags, el;
	luaL_checktype(L, 1, LUA_TTABLE);
	check_text_arg(L, 2);
	check_text_arg(L, 4);
	lua_settop(L, 4);
	if (!lua_getmetatable(L, 1))
		return luaL_argerror(L, 1, "not a stanza (no metatable)");
	mt = lua_gettop(L);
	if (lua_getfield(L, 1, "tags") != LUA_TTABLE)
		return luaL_argerror(L, 1, "not a stanza (no tags table)");
	tags = lua_gettop(L);
	/* 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z: four-digit years, as XEP-0082 writes them */
	if (secs < 0 || secs > 253402300799 || (lua_Integer)t != secs || !gmtime_r(&t, &tm) ||
	    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
		return luaL_argerror(L, 3, "time out of range (1970 to 9999)");
	lua_createtable(L, 1, 4);
	el = lua_gettop(L);
	lua_pushliteral(L, "delay");
	lua_setfield(L, el, "name");
	lua_createtable(L, 0, 3);
	lua_pushliteral(L, "urn:xmpp:delay");
	lua_setfield(L, -2, "xmlns");
	lua_pushvalue(L, 2);
	lua_setfield(L, -2, "from");
	lua_pushstring(L, stamp);
	lua_setfield(L, -2, "stamp");
	lua_setfield(L, el, "attr");
	lua_newtable(L);
	lua_setfield(L, el, "tags");
	lua_pushvalue(L, 4);
	lua_rawseti(L, el, 1);
	lua_pushvalue(L, mt);
	lua_setmetatable(L, el);
	lua_pushvalue(L, el);
	lua_rawseti(L, tags, (lua_Integer)lua_rawlen(L, tags) + 1);
	lua_rawseti(L, 1, (lua_Integer)lua_rawlen(L, 1) + 1);
	lua_settop(L, 1);
	return 1;
}
