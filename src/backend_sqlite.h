/* The sqlite backend's internals, shared by its three files: backend_sqlite.c
 * (the operations), backend_sqlite_batch.c (group commit: the deferred writes of
 * a batch, and the counter cache) and backend_sqlite_schema.c (the SQL, the
 * schema and its migrations, open and free). */
#ifndef OFFLINE_STORE_BACKEND_SQLITE_H
#define OFFLINE_STORE_BACKEND_SQLITE_H

#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "backend.h"
#include "buffer.h"
#include "hash.h"

/* The prepared statements (their SQL: sql_text in backend_sqlite_schema.c). */
enum {
	ST_BEGIN, ST_COMMIT, ST_ROLLBACK,
	ST_QUEUE_GET, ST_QUEUE_NEW, ST_QUEUE_ADD, ST_QUEUE_SUB, ST_QUEUE_DROP, ST_QUEUE_DROP_IF_EMPTY,
	ST_QUEUE_DROP_EMPTY, ST_ID_BUMP, ST_ID_GET, ST_MSG_INSERT, ST_MSG_SCAN, ST_MSG_LIST,
	ST_MSG_DEL_UPTO,
	ST_USER_DEL_MSGS, ST_HOST_DEL_MSGS, ST_HOST_DEL_QUEUE, ST_DATA_VERSION,
	ST_EXPIRED_SUB, ST_EXPIRED_DEL, ST_OLDER_SUB, ST_OLDER_DEL, ST_USERS,
	ST_DEDUP_FIND, ST_MSG_LEASE, ST_MSG_DEL_EXPIRED_UPTO, ST_HELD, ST_RELEASE, ST_RELEASE_ALL,
	ST_RENEW, ST_MSG_SUM_IDS, ST_MSG_DEL_IDS, ST_MSG_OLDEST, ST_MSG_EVICT,
	ST__COUNT
};

/* remove's (and so confirm's): up to IDS_MAX ids, in ?2 to ?33 (NULL where unused);
 * IDS_PER_STMT of them at a time (the fuzzer builds with fewer, so that its lists
 * cross statements) */
#ifndef OS_SQLITE_IDS_PER_STMT
#define OS_SQLITE_IDS_PER_STMT 32
#endif
#define IDS_MAX 32
#define IDS_PER_STMT (OS_SQLITE_IDS_PER_STMT < IDS_MAX ? OS_SQLITE_IDS_PER_STMT : IDS_MAX)

/* Group commit defers a batch's writes (see sq_flush_pending): its messages wait
 * here, their bytes copied into one arena, and its counter increments are
 * summed per queue, until a chunk is full or the batch commits. A chunk is as
 * large as the plugin's batches (256): sqlite's code then runs once per batch,
 * in one burst, rather than every few messages in between Prosody's own work.
 * A chunk of big stanzas is written once the arena holds ARENA_KEEP bytes. */
#ifndef OS_SQLITE_CHUNK /* (the fuzzer builds with small ones, so its batches cross chunks) */
#define OS_SQLITE_CHUNK 256
#define OS_SQLITE_STMT_ROWS 32
#define OS_SQLITE_ARENA_KEEP (1024 * 1024)
#endif
#define CHUNK OS_SQLITE_CHUNK           /* rows a batch defers before writing them */
#define STMT_ROWS OS_SQLITE_STMT_ROWS   /* rows per multi-row statement */
#define ARENA_KEEP OS_SQLITE_ARENA_KEEP /* arena bytes kept between chunks */

/* One message row (meta.p NULL: no metadata). While pending, its strings live
 * in the arena, at the offsets *_at (meta_at < 0: no metadata), and
 * sq_flush_pending points them there. */
typedef struct {
	int64_t qid, id, ts, expire;
	os_str from, xml, meta, dedup; /* dedup.p NULL: no key */
	long long from_at, xml_at, meta_at, dedup_at;
	int own_from; /* the sender is the stanza's own from: stored elided */
} msg_row;

typedef struct {
	int64_t qid, count, bytes;
} pend_queue;

typedef struct {
	msg_row msg[CHUNK];
	int n_msg;
	pend_queue queue[CHUNK]; /* at most one per message */
	int n_queue;
	os_buf arena; /* the rows' strings */
	/* INSERT and UPDATE statements of k rows, prepared when first needed
	 * ([1] is the statement of one row, prepared at open) */
	sqlite3_stmt *insert[STMT_ROWS + 1], *update[STMT_ROWS + 1];
} pending;

/* The counter cache: counter rows by (host, user), in a hash table (hash.h). */
typedef struct centry {
	os_link link; /* first: a link is its entry */
	int64_t qid, count, bytes;
	size_t host_n, user_n;
	char key[]; /* host, user, back to back */
} centry;

#define CACHE_MAX 65536 /* entries; a full cache starts over */

typedef struct {
	os_table t;
	int64_t data_version; /* the file's, as of the last write transaction */
} ccache;

typedef struct {
	sqlite3 *db;
	sqlite3_stmt *st[ST__COUNT];
	pending pend;
	ccache cache;
	/* The message id sequence inside the open write transaction: last id given
	 * out, valid while id_read; id_dirty when it must be written back. */
	int64_t last_id;
	int id_read, id_dirty;
} sq;

/* A statement ready for binding. Resetting here (as well as after use)
 * makes the backend safe to re-enter after an emit callback raised. */
static inline sqlite3_stmt *stmt(sq *q, int which) {
	sqlite3_stmt *st = q->st[which];
	sqlite3_reset(st);
	return st;
}

/* Strings are bound by the 64-bit calls, which take a length as it is: one over
 * sqlite's limit (a billion bytes unless built otherwise) is refused with
 * SQLITE_TOOBIG, never cut. Every bind of a string is checked: SQLITE_OK or the
 * error (the connection's error message says which). */
static inline int bind_text(sqlite3_stmt *st, int i, os_str v) {
	return sqlite3_bind_text64(st, i, v.p, (sqlite3_uint64)v.n, SQLITE_STATIC, SQLITE_UTF8);
}

static inline int bind_blob(sqlite3_stmt *st, int i, os_str v) {
	return sqlite3_bind_blob64(st, i, v.p, (sqlite3_uint64)v.n, SQLITE_STATIC);
}
/* Runs a statement that returns no rows; SQLITE_DONE on success. */
static inline int run(sqlite3_stmt *st) {
	int rc = sqlite3_step(st);
	sqlite3_reset(st);
	return rc;
}

static inline void centry_free(os_link *e) {
	free(e);
}

/* backend_sqlite.c */
OS_HIDDEN extern const os_backend sqlite_backend;
OS_HIDDEN void sq_recover(sq *q);
OS_HIDDEN int sq_abort_tx(os_store *s, sq *q);

/* backend_sqlite_batch.c */
OS_HIDDEN void sq_cache_clear(ccache *c);
OS_HIDDEN centry *sq_cache_find(ccache *c, const os_key *k, uint64_t h);
OS_HIDDEN void sq_cache_put(ccache *c, const os_key *k, uint64_t h, int64_t qid, int64_t count,
                            int64_t bytes);
OS_HIDDEN void sq_cache_drop(ccache *c, const os_key *k);
OS_HIDDEN int sq_bind_row(sqlite3_stmt *st, int base, const msg_row *r);
OS_HIDDEN int sq_flush_pending(sq *q);
OS_HIDDEN long long sq_arena_add(pending *p, const char *data, size_t n);
OS_HIDDEN pend_queue *sq_pending_queue(pending *p, int64_t qid);
OS_HIDDEN int sq_store_abort(os_store *s, sq *q);
OS_HIDDEN int sq_defer_store(os_store *s, sq *q, msg_row *r, int add);
OS_HIDDEN int sq_dedup_held(sq *q, int64_t qid, os_str d);

/* backend_sqlite_schema.c */
OS_HIDDEN void sq_free(sq *q);

#endif
