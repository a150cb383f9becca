/* offline_store.core: the Lua 5.4 face of the offline-message store.
 * One userdata per open store; every method checks its arguments, then
 * dispatches to the backend's vtable (backend.h). Runtime failures return
 * nil, message, code; programmer errors raise. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "backend.h"
#include "cache.h"
#include "hash.h"
#include "xml.h"

#define STORE_MT "offline_store.db"

int os_fail(os_store *s, int code, const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(s->errmsg, sizeof s->errmsg, fmt, ap);
	va_end(ap);
	s->errcode = code;
	return OS_FAIL;
}

/* Lua code can run in the middle of a method: a finalizer at any allocation (while
 * pop, list or users build their results, while an argument is converted), a
 * metamethod while store serializes a stanza. If that code calls the same store,
 * the store's state is checked again right before its backend runs (the store may
 * have been closed, or a batch begun or ended, meanwhile), and while a backend is
 * running with callbacks (call_emitting) the store is busy: every method, close
 * included, raises instead of entering a backend that is half-way through. */
static void check_state(lua_State *L, const os_store *s, int idle) {
	if (s->busy)
		luaL_error(L, "offline_store: store is busy (re-entrant call from a callback)");
	if (!s->be)
		luaL_error(L, "attempt to use a closed offline store");
	if (idle && s->in_batch)
		luaL_error(L, "a batch is open on this offline store: commit or roll it back first");
}

static os_store *check_open(lua_State *L) {
	os_store *s = luaL_checkudata(L, 1, STORE_MT);
	check_state(L, s, 0);
	return s;
}

/* An open store with no batch open: every method but store and the batch's own. */
static os_store *check_idle(lua_State *L) {
	os_store *s = luaL_checkudata(L, 1, STORE_MT);
	check_state(L, s, 1);
	return s;
}

static os_str check_str(lua_State *L, int arg) {
	os_str r;
	r.p = luaL_checklstring(L, arg, &r.n);
	return r;
}

/* A host or user name. */
static os_str check_name(lua_State *L, int arg) {
	os_str r = check_str(L, arg);
	luaL_argcheck(L, r.n <= OS_MAX_LEN, arg, "longer than 2147483647 bytes");
	return r;
}

static os_key check_key(lua_State *L) {
	os_key k;
	k.host = check_name(L, 2);
	k.user = check_name(L, 3);
	return k;
}

/* nil or false: OS_NONE; otherwise an integer >= min. */
static int64_t opt_int(lua_State *L, int arg, int64_t min) {
	lua_Integer v;
	if (lua_isnoneornil(L, arg) || (lua_isboolean(L, arg) && !lua_toboolean(L, arg)))
		return OS_NONE;
	v = luaL_checkinteger(L, arg);
	luaL_argcheck(L, v >= min, arg, min == 0 ? "must not be negative" : "out of range");
	return (int64_t)v;
}

static int push_fail(lua_State *L, const os_store *s) {
	luaL_pushfail(L);
	lua_pushstring(L, s->errmsg);
	lua_pushinteger(L, s->errcode);
	return 3;
}

/* A new, zeroed store userdata with its metatable, on the stack top. */
static os_store *new_store(lua_State *L) {
	os_store *s = lua_newuserdatauv(L, sizeof *s, 0);
	memset(s, 0, sizeof *s);
	luaL_setmetatable(L, STORE_MT);
	return s;
}

/* core.open_sqlite(path [, synchronous_full [, busy_timeout_ms]]) -> db | fail, msg, code
 * busy_timeout_ms: 0 to 2147483647 (sqlite takes an int); 2000 when not given. */
static int l_open_sqlite(lua_State *L) {
	os_sqlite_config cfg;
	os_store *s;
	lua_Integer busy;
	cfg.path = luaL_checkstring(L, 1);
	cfg.synchronous_full = lua_toboolean(L, 2);
	busy = luaL_optinteger(L, 3, 2000);
	luaL_argcheck(L, busy >= 0 && busy <= INT_MAX, 3, "must be 0 to 2147483647 (milliseconds)");
	cfg.busy_timeout_ms = (int)busy;
	s = new_store(L);
	if (os_sqlite_open(s, &cfg) != OS_OK)
		return push_fail(L, s);
	return 1;
}

/* core.open_memory() -> db | fail, msg, code */
static int l_open_memory(lua_State *L) {
	os_store *s = new_store(L);
	if (os_memory_open(s) != OS_OK)
		return push_fail(L, s);
	return 1;
}

/* core.open_postgres(conninfo) -> db | fail, msg, code
 * In a core built without PostgreSQL support (make POSTGRES=no; core.postgres
 * is false) it raises: the configuration asks for what this build cannot do. */
static int l_open_postgres(lua_State *L) {
	const char *conninfo = luaL_checkstring(L, 1);
#ifdef OS_WITH_POSTGRES
	os_store *s = new_store(L);
	if (os_postgres_open(s, conninfo) != OS_OK)
		return push_fail(L, s);
	return 1;
#else
	(void)conninfo;
	return luaL_error(L, "offline_store.core was built without PostgreSQL support (libpq): rebuild it "
	                     "with libpq's headers installed (Debian: libpq-dev) and `make POSTGRES=yes`, "
	                     "or choose the sqlite or memory backend");
#endif
}

/* db:store(host, user, from, xml, ts [, expire [, max_count [, max_bytes [, meta [, dedup
 *          [, evict]]]]]])
 *   -> count, id [, evicted] | false, "limit", count | false, "duplicate", count
 *    | false, "too deep" | fail, msg, code
 * dedup (a string): nothing is stored when the user's queue holds a row with the same dedup.
 * evict (true): over a limit, the oldest unleased messages are deleted to make room, in the
 * same transaction; evicted (returned when evict is given) says how many.
 * xml is a string, or a util.stanza tree, stored as core.serialize(xml, true)
 * writes it (without the top element's delays) with no Lua string in between;
 * a tree deeper than the serializer goes gives false, "too deep", storing nothing. */
/* Reads store's arguments (from 2). Returns -1 when they are good, else the
 * number of values it pushed for the caller to return (too deep, too large). */
static int check_store_args(lua_State *L, os_store *s, os_key *k, os_item *m, os_limit *lim) {
	int tree = lua_type(L, 5) == LUA_TTABLE;
	*k = check_key(L);
	m->from = check_str(L, 4);
	if (!tree)
		m->xml = check_str(L, 5);
	m->ts = (int64_t)luaL_checkinteger(L, 6);
	m->expire = opt_int(L, 7, INT64_MIN + 1);
	lim->max_count = opt_int(L, 8, 0);
	lim->max_bytes = opt_int(L, 9, 0);
	if (lua_isnoneornil(L, 10))
		m->meta.p = NULL, m->meta.n = 0;
	else
		m->meta = check_str(L, 10);
	if (lua_isnoneornil(L, 11))
		m->dedup.p = NULL, m->dedup.n = 0;
	else
		m->dedup = check_str(L, 11);
	lim->evict_oldest = lua_toboolean(L, 12);
	m->lease_owner.p = NULL, m->lease_owner.n = 0, m->lease_until = 0;
	if (tree && os_xml_write(L, 5, 1, &m->xml.p, &m->xml.n) != 0) {
		lua_pushboolean(L, 0);
		lua_pushliteral(L, "too deep");
		return 2;
	}
	if (m->from.n > OS_MAX_LEN || m->xml.n > OS_MAX_LEN || m->meta.n > OS_MAX_LEN ||
	    m->dedup.n > OS_MAX_LEN) {
		if (s->in_batch && !s->busy && s->be) { /* a store that fails in a batch ends it */
			s->in_batch = 0;
			s->be->batch_end(s, 0);
		}
		os_fail(s, 0, "message too large to store: more than %d bytes in one field", OS_MAX_LEN);
		return push_fail(L, s);
	}
	return -1;
}

/* Pushes what store returns for backend result rc. */
static int push_stored(lua_State *L, const os_store *s, int rc, int64_t count, int64_t id) {
	if (rc == OS_FAIL)
		return push_fail(L, s);
	if (rc == OS_LIMIT || rc == OS_DUP) {
		lua_pushboolean(L, 0);
		lua_pushstring(L, rc == OS_LIMIT ? "limit" : "duplicate");
		lua_pushinteger(L, count);
		return 3;
	}
	lua_pushinteger(L, count);
	lua_pushinteger(L, id);
	return 2;
}

static int l_store(lua_State *L) {
	os_store *s = check_open(L);
	os_key k;
	os_item m;
	os_limit lim;
	int64_t count = 0, id = 0, evicted = 0;
	int rc, n = check_store_args(L, s, &k, &m, &lim);
	if (n >= 0)
		return n;
	check_state(L, s, 0);
	rc = s->be->store(s, &k, &m, &lim, &count, &id, &evicted);
	n = push_stored(L, s, rc, count, id);
	if (rc != OS_OK || !lim.evict_oldest)
		return n;
	lua_pushinteger(L, evicted);
	return 3;
}

/* db:send(host, user, from, xml, ts [, expire [, max_count [, max_bytes [, meta [, dedup]]]]])
 *   -> true | false, "too deep" | false, "not pipelined" | false, "no batch" | fail, msg, code
 * Inside a batch, on a backend that pipelines (postgres): hands the store to the
 * server without waiting for its outcome, which db:outcome(i) gives once db:commit()
 * succeeded (i counts this batch's sends from 1). Fails as a store in the batch
 * fails: the whole batch is over. "not pipelined": the backend has no such thing,
 * "no batch": no batch is open; nothing was done, use db:store. */
static int l_send(lua_State *L) {
	os_store *s = check_open(L);
	os_key k;
	os_item m;
	os_limit lim;
	int n;
	if (!s->be->store_send || !s->in_batch) {
		lua_pushboolean(L, 0);
		if (s->be->store_send)
			lua_pushliteral(L, "no batch");
		else
			lua_pushliteral(L, "not pipelined");
		return 2;
	}
	if ((n = check_store_args(L, s, &k, &m, &lim)) >= 0)
		return n;
	luaL_argcheck(L, !lim.evict_oldest, 12, "eviction is not pipelined: use db:store");
	check_state(L, s, 0);
	if (!s->in_batch)
		return luaL_error(L, "the batch on this offline store ended while the message was read");
	if (s->be->store_send(s, &k, &m, &lim) != OS_OK)
		return push_fail(L, s);
	lua_pushboolean(L, 1);
	return 1;
}

/* db:outcome(i) -> what db:store would have returned for the batch's i-th send (from 1):
 * count, id | false, "limit", count | false, "duplicate", count. Valid once db:commit()
 * succeeded, until the next db:begin(); raises for an i that was not sent. */
static int l_outcome(lua_State *L) {
	os_store *s = check_open(L);
	lua_Integer i = luaL_checkinteger(L, 2);
	int64_t count = 0, id = 0;
	int rc;
	luaL_argcheck(L, i >= 1 && s->be->outcome, 2, "no such send");
	rc = s->be->outcome(s, (size_t)(i - 1), &count, &id);
	luaL_argcheck(L, rc != OS_FAIL, 2, "no such send in the last committed batch");
	return push_stored(L, s, rc, count, id);
}

typedef struct {
	lua_State *L;
	lua_Integer n;
} collector;

/* Appends {id=, ts=, expire=, from=, xml=, meta=, lease_owner=, lease_until=} to
 * the table on top. */
static void collect_item(void *ud, const os_item *it) {
	collector *c = ud;
	lua_State *L = c->L;
	/* sized for the fields it has: a table for 6 takes 8 slots, one for 4 takes 4 */
	lua_createtable(L, 0, 4 + (it->expire != OS_NONE) + (it->meta.p != NULL) +
	                          2 * (it->lease_owner.p != NULL));
	lua_pushinteger(L, it->id);
	lua_setfield(L, -2, "id");
	lua_pushinteger(L, it->ts);
	lua_setfield(L, -2, "ts");
	if (it->expire != OS_NONE) {
		lua_pushinteger(L, it->expire);
		lua_setfield(L, -2, "expire");
	}
	lua_pushlstring(L, it->from.p, it->from.n);
	lua_setfield(L, -2, "from");
	lua_pushlstring(L, it->xml.p, it->xml.n);
	lua_setfield(L, -2, "xml");
	if (it->meta.p) {
		lua_pushlstring(L, it->meta.p, it->meta.n);
		lua_setfield(L, -2, "meta");
	}
	if (it->lease_owner.p) {
		lua_pushlstring(L, it->lease_owner.p, it->lease_owner.n);
		lua_setfield(L, -2, "lease_owner");
		lua_pushinteger(L, it->lease_until);
		lua_setfield(L, -2, "lease_until");
	}
	lua_rawseti(L, -2, ++c->n);
}

/* A backend call that emits into a table (pop, lease, list, users), run by call_emitting. */
typedef struct emitting {
	os_store *s;
	int (*run)(struct emitting *, collector *);
	os_key k;
	os_str host, owner;
	int64_t a, b, c, expired, held;
	int rc;
} emitting;

static int run_emitting(lua_State *L) {
	emitting *e = lua_touserdata(L, 1);
	collector c;
	c.L = L;
	c.n = 0;
	lua_newtable(L);
	e->rc = e->run(e, &c);
	return 1;
}

/* Runs e->run with the store busy (see check_state), in protected mode, so that
 * busy is cleared on every way out: an emit callback can raise (out of memory),
 * and its error is raised again once the backend has abandoned the call
 * (backend.h) and the store is usable. Leaves the table of
 * what was emitted on the stack; returns the backend's result. */
static int call_emitting(lua_State *L, emitting *e) {
	int status;
	check_state(L, e->s, 1);
	e->s->busy = 1;
	lua_pushcfunction(L, run_emitting);
	lua_pushlightuserdata(L, e);
	status = lua_pcall(L, 1, 1, 0);
	e->s->busy = 0;
	if (status != LUA_OK) {
		if (e->s->be->abandon)
			e->s->be->abandon(e->s);
		lua_error(L);
	}
	return e->rc;
}

static int run_pop(emitting *e, collector *c) {
	os_str nobody = { NULL, 0 };
	return e->s->be->take(e->s, &e->k, nobody, e->a, 0, e->b, collect_item, c, &e->expired, &e->held);
}

/* Pushes held (the end of the live lease that holds the queue back) unless OS_NONE. */
static int push_held(lua_State *L, int n, int64_t held) {
	if (held == OS_NONE)
		return n;
	lua_pushinteger(L, held);
	return n + 1;
}

/* db:pop(host, user, now [, max]) -> items, expired [, leased_until] | fail, msg, code
 * Rows under a live lease are neither returned nor deleted; when the oldest row
 * to deliver is one, items is empty and leased_until says until when. */
static int l_pop(lua_State *L) {
	emitting e;
	e.s = check_idle(L);
	e.k = check_key(L);
	e.a = (int64_t)luaL_checkinteger(L, 4);
	e.b = opt_int(L, 5, 0);
	e.expired = 0;
	e.held = OS_NONE;
	e.run = run_pop;
	if (call_emitting(L, &e) != OS_OK)
		return push_fail(L, e.s);
	lua_pushinteger(L, e.expired);
	return push_held(L, 2, e.held);
}

static int run_lease(emitting *e, collector *c) {
	return e->s->be->take(e->s, &e->k, e->owner, e->a, e->c, e->b, collect_item, c, &e->expired, &e->held);
}

/* db:lease(host, user, owner, now, until [, max]) -> items | {}, leased_until | fail, msg, code
 * Marks up to max free rows (owner, until) and returns them, as pop would but
 * without deleting them; see backend.h. */
static int l_lease(lua_State *L) {
	emitting e;
	e.s = check_idle(L);
	e.k = check_key(L);
	e.owner = check_name(L, 4);
	e.a = (int64_t)luaL_checkinteger(L, 5);
	e.c = (int64_t)luaL_checkinteger(L, 6);
	e.b = opt_int(L, 7, 0);
	e.held = OS_NONE;
	e.run = run_lease;
	if (call_emitting(L, &e) != OS_OK)
		return push_fail(L, e.s);
	return push_held(L, 1, e.held);
}

/* db:count(host, user) -> count, bytes | fail, msg, code */
static int l_count(lua_State *L) {
	os_store *s = check_idle(L);
	os_key k = check_key(L);
	int64_t count, bytes;
	check_state(L, s, 1);
	if (s->be->count(s, &k, &count, &bytes) != OS_OK)
		return push_fail(L, s);
	lua_pushinteger(L, count);
	lua_pushinteger(L, bytes);
	return 2;
}

static int run_list(emitting *e, collector *c) {
	return e->s->be->list(e->s, &e->k, e->a, e->b, collect_item, c);
}

/* db:list(host, user [, after_id [, max]]) -> items | fail, msg, code */
static int l_list(lua_State *L) {
	emitting e;
	e.s = check_idle(L);
	e.k = check_key(L);
	e.a = (int64_t)luaL_optinteger(L, 4, 0);
	e.b = opt_int(L, 5, 0);
	e.run = run_list;
	if (call_emitting(L, &e) != OS_OK)
		return push_fail(L, e.s);
	return 1;
}

static int push_touched(lua_State *L, os_store *s, int rc, int64_t touched) {
	if (rc != OS_OK)
		return push_fail(L, s);
	lua_pushinteger(L, touched);
	return 1;
}

/* db:remove(host, user, {id, ...}) -> n | fail, msg, code */
static int l_remove(lua_State *L) {
	os_store *s = check_idle(L);
	os_key k = check_key(L);
	int64_t *ids, touched = 0;
	lua_Integer i, n;
	luaL_checktype(L, 4, LUA_TTABLE);
	n = (lua_Integer)lua_rawlen(L, 4);
	/* A userdata buffer: collected by Lua even if a check below raises. */
	ids = lua_newuserdatauv(L, (size_t)n * sizeof *ids + 1, 0);
	for (i = 0; i < n; i++) {
		int isnum;
		lua_rawgeti(L, 4, i + 1);
		ids[i] = (int64_t)lua_tointegerx(L, -1, &isnum);
		if (!isnum)
			return luaL_argerror(L, 4, "ids must be integers");
		lua_pop(L, 1);
	}
	int rc;
	check_state(L, s, 1);
	rc = s->be->remove(s, &k, ids, (size_t)n, &touched);
	return push_touched(L, s, rc, touched);
}

/* db:release(host, user, owner) -> n | fail, msg, code: owner's leases on the
 * user's rows are cleared. */
static int l_release(lua_State *L) {
	os_store *s = check_idle(L);
	os_key k = check_key(L);
	os_str owner = check_name(L, 4);
	int64_t touched = 0;
	int rc;
	check_state(L, s, 1);
	rc = s->be->release(s, &k, owner, &touched);
	return push_touched(L, s, rc, touched);
}

/* db:release_all([prefix]) -> n | fail, msg, code: every lease, or those whose
 * owner starts with prefix. */
static int l_release_all(lua_State *L) {
	os_store *s = check_idle(L);
	os_str prefix;
	int64_t touched = 0;
	int rc;
	if (!lua_isnoneornil(L, 2))
		prefix = check_name(L, 2);
	check_state(L, s, 1);
	rc = s->be->release_all(s, lua_isnoneornil(L, 2) ? NULL : &prefix, &touched);
	return push_touched(L, s, rc, touched);
}

/* db:renew(prefix, until) -> n | fail, msg, code */
static int l_renew(lua_State *L) {
	os_store *s = check_idle(L);
	os_str prefix = check_name(L, 2);
	int64_t until = (int64_t)luaL_checkinteger(L, 3), touched = 0;
	int rc;
	check_state(L, s, 1);
	rc = s->be->renew(s, prefix, until, &touched);
	return push_touched(L, s, rc, touched);
}

/* db:remove_user(host, user) -> n | fail, msg, code */
static int l_remove_user(lua_State *L) {
	os_store *s = check_idle(L);
	os_key k = check_key(L);
	int64_t touched = 0;
	int rc;
	check_state(L, s, 1);
	rc = s->be->remove_user(s, &k, &touched);
	return push_touched(L, s, rc, touched);
}

/* db:remove_host(host) -> n | fail, msg, code */
static int l_remove_host(lua_State *L) {
	os_store *s = check_idle(L);
	os_str host = check_name(L, 2);
	int64_t touched = 0;
	int rc;
	check_state(L, s, 1);
	rc = s->be->remove_host(s, host, &touched);
	return push_touched(L, s, rc, touched);
}

/* db:delete_expired(now) -> n | fail, msg, code */
static int l_delete_expired(lua_State *L) {
	os_store *s = check_idle(L);
	int64_t now = (int64_t)luaL_checkinteger(L, 2), touched = 0;
	int rc = s->be->delete_expired(s, now, &touched);
	return push_touched(L, s, rc, touched);
}

/* db:delete_older_than(cutoff) -> n | fail, msg, code */
static int l_delete_older_than(lua_State *L) {
	os_store *s = check_idle(L);
	int64_t cutoff = (int64_t)luaL_checkinteger(L, 2), touched = 0;
	int rc = s->be->delete_older_than(s, cutoff, &touched);
	return push_touched(L, s, rc, touched);
}

static void collect_user(void *ud, os_str user, int64_t count, int64_t bytes) {
	collector *c = ud;
	lua_State *L = c->L;
	lua_createtable(L, 0, 3);
	lua_pushlstring(L, user.p, user.n);
	lua_setfield(L, -2, "user");
	lua_pushinteger(L, count);
	lua_setfield(L, -2, "count");
	lua_pushinteger(L, bytes);
	lua_setfield(L, -2, "bytes");
	lua_rawseti(L, -2, ++c->n);
}

static int run_users(emitting *e, collector *c) {
	return e->s->be->users(e->s, e->host, collect_user, c);
}

/* db:users(host) -> {{user=, count=, bytes=}, ...} | fail, msg, code */
static int l_users(lua_State *L) {
	emitting e;
	e.s = check_idle(L);
	e.host = check_name(L, 2);
	e.run = run_users;
	if (call_emitting(L, &e) != OS_OK)
		return push_fail(L, e.s);
	return 1;
}

/* db:begin() -> true | false (this backend has no group commit) | fail, msg, code
 * Opens a batch: the stores that follow join one transaction, made durable by
 * db:commit(). Only store, commit, rollback and close are allowed meanwhile. A
 * store that fails inside the batch ends it: nothing stored since begin stays. */
static int l_begin(lua_State *L) {
	os_store *s = check_idle(L);
	if (!s->be->batch_begin) {
		lua_pushboolean(L, 0);
		return 1;
	}
	if (s->be->batch_begin(s) != OS_OK)
		return push_fail(L, s);
	s->in_batch = 1;
	lua_pushboolean(L, 1);
	return 1;
}

/* db:commit() and db:rollback() -> true | fail, msg, code (nothing of the batch stored).
 * With no batch open (none begun, or a failed store ended it) they do nothing. */
static int end_batch(lua_State *L, int do_commit) {
	os_store *s = check_open(L);
	if (!s->in_batch) {
		lua_pushboolean(L, 1);
		return 1;
	}
	s->in_batch = 0;
	if (s->be->batch_end(s, do_commit) != OS_OK)
		return push_fail(L, s);
	lua_pushboolean(L, 1);
	return 1;
}

static int l_commit(lua_State *L) {
	return end_batch(L, 1);
}

static int l_rollback(lua_State *L) {
	return end_batch(L, 0);
}

/* db:backend() -> "sqlite" | "memory" | "postgres" */
static int l_backend(lua_State *L) {
	os_store *s = check_open(L);
	lua_pushstring(L, s->be->name);
	return 1;
}

/* db:close(); also __close and __gc. Idempotent. An open batch is committed
 * first (the caller commits itself to learn the outcome). */
static int l_close(lua_State *L) {
	os_store *s = luaL_checkudata(L, 1, STORE_MT);
	if (s->busy)
		check_state(L, s, 0); /* raises */
	if (s->be) {
		const os_backend *be = s->be;
		if (s->in_batch) {
			s->in_batch = 0;
			be->batch_end(s, 1);
		}
		s->be = NULL;
		be->close(s);
	}
	return 0;
}

static int l_tostring(lua_State *L) {
	os_store *s = luaL_checkudata(L, 1, STORE_MT);
	if (s->be)
		lua_pushfstring(L, "offline_store.db (%s): %p", s->be->name, (void *)s);
	else
		lua_pushfstring(L, "offline_store.db (closed): %p", (void *)s);
	return 1;
}

static const luaL_Reg methods[] = {
	{"store", l_store},
	{"send", l_send},
	{"outcome", l_outcome},
	{"pop", l_pop},
	{"lease", l_lease},
	{"confirm", l_remove}, /* an acked row: deleted (same as remove) */
	{"release", l_release},
	{"release_all", l_release_all},
	{"renew", l_renew},
	{"count", l_count},
	{"list", l_list},
	{"remove", l_remove},
	{"remove_user", l_remove_user},
	{"remove_host", l_remove_host},
	{"delete_expired", l_delete_expired},
	{"delete_older_than", l_delete_older_than},
	{"users", l_users},
	{"begin", l_begin},
	{"commit", l_commit},
	{"rollback", l_rollback},
	{"backend", l_backend},
	{"close", l_close},
	{NULL, NULL},
};

static const luaL_Reg metamethods[] = {
	{"__gc", l_close},
	{"__close", l_close},
	{"__tostring", l_tostring},
	{NULL, NULL},
};

/* core._hash(a [, b [, key]]) -> integer: internal, for the specs. The hash
 * of a (core.cache's keys) or of a, "\xff", b (the backends' queue keys, a the
 * host and b the user) that the tables use, under the process key or under
 * the given 16-byte key. */
static int l_hash(lua_State *L) {
	size_t an, bn, kn;
	const char *a = luaL_checklstring(L, 1, &an), *b = luaL_optlstring(L, 2, NULL, &bn),
	           *key = luaL_optlstring(L, 3, NULL, &kn);
	uint64_t h;
	luaL_argcheck(L, !key || kn == 16, 3, "must be 16 bytes");
	if (key)
		h = os_siphash((const unsigned char *)key, a, an, b, b ? bn : 0);
	else
		h = b ? os_hash_pair(a, an, b, bn) : os_hash(a, an);
	lua_pushinteger(L, (lua_Integer)h);
	return 1;
}

static const luaL_Reg functions[] = {
	{"open_sqlite", l_open_sqlite},
	{"open_memory", l_open_memory},
	{"open_postgres", l_open_postgres},
	{"serialize", os_xml_serialize},
	{"parse", os_xml_parse},
	{"delay", os_xml_delay},
	{"cache", os_cache_new},
	{"_hash", l_hash},
	{NULL, NULL},
};

__attribute__((visibility("default"))) int luaopen_offline_store_core(lua_State *L) {
	luaL_checkversion(L);
	os_hash_init();
	if (luaL_newmetatable(L, STORE_MT)) {
		luaL_setfuncs(L, metamethods, 0);
		luaL_newlib(L, methods);
		lua_setfield(L, -2, "__index");
	}
	lua_pop(L, 1);
	os_cache_register(L);
	luaL_newlib(L, functions);
	lua_pushliteral(L, "0.1.0");
	lua_setfield(L, -2, "version");
	lua_pushliteral(L, OS_SET_ASIDE); /* the meta of a row set aside (backend.h) */
	lua_setfield(L, -2, "SET_ASIDE");
#ifdef OS_WITH_POSTGRES
	lua_pushboolean(L, 1);
#else
	lua_pushboolean(L, 0);
#endif
	lua_setfield(L, -2, "postgres"); /* whether open_postgres can open */
	return 1;
}
