/* The internal interface between the Lua-facing functions (core.c) and one
 * storage backend (backend_memory.c, backend_sqlite*.c, backend_postgres*.c). Backends know rows,
 * transactions, counters and bytes; they never touch the Lua stack except
 * through the emit callbacks, and never raise. */
#ifndef OFFLINE_STORE_BACKEND_H
#define OFFLINE_STORE_BACKEND_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__)
#define OS_HIDDEN __attribute__((visibility("hidden")))
#else
#define OS_HIDDEN
#endif

/* "No expiry" and "no limit" are both spelled with this value. */
#define OS_NONE INT64_MIN

enum { OS_OK = 0, OS_LIMIT = 1, OS_FAIL = 2, OS_DUP = 3 };

typedef struct { const char *p; size_t n; } os_str;

/* The longest string a backend is handed: core.c refuses longer ones, so every
 * length fits the int that sqlite's and libpq's calls take. */
#define OS_MAX_LEN INT_MAX

typedef struct {
	os_str host, user;
} os_key;

/* Keys kept in hash tables (the memory backend's queues, the sqlite counter
 * cache) are stored as host then user, back to back. */
static inline int os_key_is(const char *key, size_t host_n, size_t user_n, const os_key *k) {
	return host_n == k->host.n && user_n == k->user.n && memcmp(key, k->host.p, host_n) == 0 &&
	       memcmp(key + host_n, k->user.p, user_n) == 0;
}

static inline void os_key_copy(char *key, const os_key *k) {
	memcpy(key, k->host.p, k->host.n);
	memcpy(key + k->host.n, k->user.p, k->user.n);
}

/* One stored item as the backend hands it out; pointers are valid only
 * for the duration of the emit call. lease_owner is set by list only (pop and
 * lease emit it NULL); dedup is read by store only (backends emit it NULL). */
typedef struct {
	int64_t id, ts, expire; /* expire == OS_NONE: never */
	os_str from, xml, meta; /* meta.p == NULL: no metadata */
	os_str dedup;           /* p == NULL: none (see store) */
	os_str lease_owner;     /* p == NULL: free; else leased until lease_until */
	int64_t lease_until;
} os_item;

/* A row set aside: its message could not be turned back into a stanza (damaged,
 * or written by another program), so the plugin stored it again with exactly
 * these bytes as its meta. pop neither emits nor deletes such a row (nor counts
 * it toward its max or in *expired), so its cost is a skipped row; every other operation treats it as any row: it counts in count and bytes (so
 * toward the recipient's limits), list returns it, and remove, remove_user,
 * remove_host, delete_expired and delete_older_than delete it. Plain
 * characters, so the SQL backends write it as a literal. Callers must not use
 * this meta value for other rows. */
#define OS_SET_ASIDE "offline-store:set-aside"
static inline int os_is_set_aside(os_str meta) {
	return meta.p && meta.n == sizeof OS_SET_ASIDE - 1 && memcmp(meta.p, OS_SET_ASIDE, meta.n) == 0;
}

typedef struct {
	int64_t max_count; /* OS_NONE: unlimited */
	int64_t max_bytes; /* OS_NONE: unlimited */
	int evict_oldest;  /* over the limit: make room by evicting (see store below) */
} os_limit;

/* The limit decision, the same in every backend: whether a queue holding count
 * messages of `bytes` stanza bytes has no room for one more of xml_n bytes.
 * (The postgres backend decides it in its store statement, under the queue
 * row's lock, by this same rule.) */
static inline int os_over_limit(const os_limit *lim, int64_t count, int64_t bytes, size_t xml_n) {
	return (lim->max_count != OS_NONE && count + 1 > lim->max_count) ||
	       (lim->max_bytes != OS_NONE && bytes + (int64_t)xml_n > lim->max_bytes);
}

/* Whether a message of xml_n bytes could never fit, however much is evicted. */
static inline int os_never_fits(const os_limit *lim, size_t xml_n) {
	return (lim->max_count != OS_NONE && lim->max_count < 1) ||
	       (lim->max_bytes != OS_NONE && (int64_t)xml_n > lim->max_bytes);
}

/* Eviction's walk, the same in every backend: the queue holds *count messages
 * of *bytes; a row of row_n bytes, leased or not, comes next in id order.
 * Returns 1 when the row is to be evicted (and takes it off *count and
 * *bytes), 0 when it is passed over (it is leased: a row with a lease owner,
 * live or run out, is never evicted). The walk stops once os_over_limit says
 * there is room; a walk that reaches the end of the queue first evicts
 * nothing (OS_LIMIT). Rows set aside and expired rows are evicted like any. */
static inline int os_evict_row(int64_t *count, int64_t *bytes, int64_t row_n, int leased) {
	if (leased)
		return 0;
	*count -= 1;
	*bytes -= row_n;
	return 1;
}

static inline int os_is_expired(int64_t expire, int64_t now) {
	return expire != OS_NONE && expire <= now;
}

/* What take (below) does with a row it walks to, the same in every backend:
 * skips it (set aside, or in flight to owner already), deletes it (expired),
 * takes it, or stops (a live lease that is not owner's; owner.p NULL, as pop
 * has it: anybody's). */
enum { OS_TAKE_SKIP, OS_TAKE_EXPIRED, OS_TAKE_ROW, OS_TAKE_STOP };
static inline int os_take_what(const os_item *it, os_str owner, int64_t now) {
	if (os_is_set_aside(it->meta))
		return OS_TAKE_SKIP;
	if (os_is_expired(it->expire, now))
		return OS_TAKE_EXPIRED;
	if (it->lease_owner.p && it->lease_until > now)
		return owner.p && it->lease_owner.n == owner.n &&
		       memcmp(it->lease_owner.p, owner.p, owner.n) == 0 ? OS_TAKE_SKIP : OS_TAKE_STOP;
	return OS_TAKE_ROW;
}

/* Emit callbacks hand one row (or user) to core.c, which copies it into a Lua
 * table. They may raise a Lua error (out of memory): lua_error longjmps out of
 * the callback and out of the backend, to core.c's call_emitting, which clears
 * os_store.busy, runs the backend's abandon step (4. below) and raises again. They may also run Lua code (finalizers);
 * busy keeps that code from entering the same store meanwhile.
 *
 * The cleanup rule, the same in every backend, for a call that an emit can
 * abandon at any emit:
 *  1. Nothing only a C local points to while an emit can run: memory the call
 *     allocates for itself is allocated after its last emit (memory's lease
 *     owner, postgres's id array), and what it reads rows from hangs off the
 *     store (sqlite's prepared statements, postgres's `live` result).
 *  2. Nothing half-changed that another call could see: memory changes a
 *     queue only after its last emit (emit, then unlink); sqlite and postgres
 *     emit inside the transaction that the call commits after its last emit.
 *  3. Every call begins with its backend's recover step (a store inside a
 *     batch joins the open transaction instead), which undoes what an
 *     abandoned call left: sq_recover (resets statements left
 *     stepping, rolls back, forgets deferred rows) and pg_recover (frees
 *     `live`, rolls back; also reconnects); the memory backend has nothing to
 *     undo. close does the same.
 *  4. The abandon step runs at once when an emit raised (core.c, before the
 *     error goes on): it undoes what the recover step would, without
 *     reconnecting, so that nothing the call holds (postgres's row locks,
 *     sqlite's write lock on the file) makes other connections wait until
 *     this store's next call: sq_abandon and pg_abandon; memory has none. The
 *     recover step stays, for what the abandon step could not undo.
 * Failures that do not raise return OS_FAIL through os_fail: a function that
 * owns something (a PGresult, malloc'd memory) leaves through its one exit
 * (`goto done`) that frees it; one that owns nothing returns at once (sqlite's
 * `return sq_abort_tx(...)`, which rolls back). */
typedef void (*os_emit_item)(void *ud, const os_item *item);
typedef void (*os_emit_user)(void *ud, os_str user, int64_t count, int64_t bytes);

typedef struct os_store os_store;

/* Leases (acknowledged delivery). A row is leased when it has an owner (any
 * bytes) and a lease_until; the lease is live while lease_until > now, and a row
 * whose lease ran out is free. Leasing changes no counter: a leased row is
 * stored, counted, listed (with its owner) and deleted like any row.
 *
 * store: when the queue has no room for the message (os_over_limit) and
 *   lim->evict_oldest is set, the oldest rows of the queue that are not leased
 *   are deleted, in id order, until it has room (os_evict_row), and the message
 *   is stored, all in one transaction: *evicted says how many were deleted. A
 *   message that could never fit (os_never_fits), or a queue whose unleased rows
 *   do not make room, gives OS_LIMIT with nothing deleted. The walk reads the
 *   queue's front only: the rows it evicts and the leased rows it passes over.
 *   *evicted is 0 whenever nothing was evicted.
 *   item->dedup.p non-NULL is a key; when a row of the user's queue (leased,
 *   set aside, or written by the open batch but not committed, included) has the
 *   same key, nothing is stored and OS_DUP is returned with *count the queue's
 *   count. Checked before the limit; exact under concurrent writers. A row's key
 *   goes with the row.
 * pop and lease walk the user's rows in id order, skip set-aside rows, delete
 *   expired ones (counted in *expired, pop only) and take free rows, up to max
 *   (OS_NONE: all), stopping at the first row under a live lease that is not
 *   the caller's (pop has no owner: every live lease stops it). pop deletes what
 *   it takes; lease sets (owner, until) on it and skips rows that `owner` holds
 *   already. When the walk stopped at such a lease having taken nothing, *held is
 *   the latest lease_until among the user's live leases of other owners (pop:
 *   of any owner); otherwise OS_NONE.
 * release clears owner's leases on one user's rows; release_all clears every
 *   lease, or (prefix non-NULL) every lease whose owner starts with *prefix;
 *   renew sets lease_until = until on every lease whose owner starts with
 *   prefix. *touched: rows changed. Rows keep their id, order and contents. */
typedef struct {
	const char *name;
	int (*store)(os_store *, const os_key *, const os_item *, const os_limit *,
	             int64_t *count, int64_t *id, int64_t *evicted);
	/* pop (owner.p == NULL: emitted rows are deleted) and lease (emitted rows
	 * are leased to owner until `until`) in one walk of the queue. */
	int (*take)(os_store *, const os_key *, os_str owner, int64_t now, int64_t until,
	            int64_t max, os_emit_item, void *ud, int64_t *expired, int64_t *held);
	int (*release)(os_store *, const os_key *, os_str owner, int64_t *touched);
	int (*release_all)(os_store *, const os_str *prefix, int64_t *touched);
	int (*renew)(os_store *, os_str prefix, int64_t until, int64_t *touched);
	int (*count)(os_store *, const os_key *, int64_t *count, int64_t *bytes);
	int (*list)(os_store *, const os_key *, int64_t after_id, int64_t max,
	            os_emit_item, void *ud);
	int (*remove)(os_store *, const os_key *, const int64_t *ids, size_t n,
	              int64_t *touched);
	int (*remove_user)(os_store *, const os_key *, int64_t *touched);
	int (*remove_host)(os_store *, os_str host, int64_t *touched);
	int (*delete_expired)(os_store *, int64_t now, int64_t *touched);
	int (*delete_older_than)(os_store *, int64_t cutoff, int64_t *touched);
	int (*users)(os_store *, os_str host, os_emit_user, void *ud);
	void (*close)(os_store *);
	/* Step 4. of the cleanup rule above; NULL where there is nothing to undo. */
	void (*abandon)(os_store *);
	/* Group commit; NULL where the backend has none (every store is then its
	 * own transaction). batch_begin opens a transaction that the following
	 * stores join instead of committing each; batch_end commits it (commit = 1)
	 * or rolls it back (0). A store that fails inside a batch rolls the whole
	 * batch back and clears s->in_batch. core.c sets in_batch and keeps every
	 * other operation out while it is set. */
	int (*batch_begin)(os_store *);
	int (*batch_end)(os_store *, int commit);
	/* Pipelined stores, inside a batch; NULL where the backend has none.
	 * store_send hands a store (no eviction: lim->evict_oldest is 0) to the
	 * server without waiting for its outcome: OS_OK, or OS_FAIL when the batch
	 * is over (rolled back, in_batch cleared, as a failed store). batch_end
	 * reads the outcomes of the stores sent (a store made meanwhile reads them
	 * first) before it commits; once it committed, outcome(i) is the i-th
	 * send's (from 0): what store would have returned, with *count the queue's
	 * count also when refused. Outcomes are kept until the next batch_begin. */
	int (*store_send)(os_store *, const os_key *, const os_item *, const os_limit *);
	int (*outcome)(os_store *, size_t i, int64_t *count, int64_t *id);
} os_backend;

/* The userdata behind every open store. */
struct os_store {
	const os_backend *be; /* NULL once closed */
	void *impl;
	int in_batch;         /* a batch is open (see batch_begin) */
	int busy;             /* a backend call that calls back into Lua is running (core.c) */
	int errcode;          /* backend's raw code of the last failure */
	char errmsg[256];     /* its text */
};

/* Records a failure; returns OS_FAIL so callers can `return os_fail(...)`. */
OS_HIDDEN int os_fail(os_store *s, int code, const char *fmt, ...)
#if defined(__GNUC__)
	__attribute__((format(printf, 3, 4)))
#endif
	;

typedef struct {
	const char *path;
	int synchronous_full;  /* 0: NORMAL (default), 1: FULL */
	int busy_timeout_ms;
} os_sqlite_config;

/* Each returns OS_OK with s->be and s->impl set, or OS_FAIL with the
 * error recorded in s and nothing left open. */
OS_HIDDEN int os_sqlite_open(os_store *s, const os_sqlite_config *cfg);
OS_HIDDEN int os_memory_open(os_store *s);
/* conninfo: a libpq connection string or URI; OS_FAIL with code 0 when the
 * server cannot be reached or refuses the credentials. */
OS_HIDDEN int os_postgres_open(os_store *s, const char *conninfo);

#endif
