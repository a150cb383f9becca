/* The sqlite backend: one file, WAL, every statement prepared once at open.
 * A per-user row in `queue` holds the message count and stanza bytes and is
 * updated in the same transaction as every insert and delete, so the limit
 * check in store() reads one row instead of counting the queue.
 *
 * Messages live in a rowid table keyed by their id, so a store appends at the
 * end of the table, and an index on their queue's integer id (the counter
 * row's rowid), whose entries end with the rowid, gives a user's messages in id
 * order. A commit of many stores to many users (the group commit under load)
 * therefore writes the few table pages at the end plus one small index page per
 * user, where the version 2 layout (clustered by host, user, id) wrote a full
 * page of rows per user and split pages as queues grew. A pop pays for it: a
 * user's messages sit on as many pages as were written between them. Version 4
 * keys the index by the queue id instead of (host, user): entries a third the
 * size, so fewer index pages to write per commit, and integer comparisons.
 * Queue ids are AUTOINCREMENT, never reused: a message can only ever belong to
 * the queue it was stored in. Measured per layout by bench/batch.lua (doc/performance.md:
 * "The sqlite backend under group commit").
 *
 * Under group commit a store reads its counter row (the limit needs it) and
 * defers the rest: a batch's rows are written together (up to 256 rows or 1 MB
 * at a time) by multi-row INSERTs of 32 rows, and the counters by UPDATEs of
 * their sums (flush_pending), which saves most of sqlite's per-statement work
 * and runs its code in one burst per batch.
 *
 * The counter rows a store reads are cached (ccache): queue id, count and bytes
 * per (host, user), as this connection last wrote or read them. Every write
 * transaction first checks PRAGMA data_version, which changes when another
 * connection has committed, and forgets the cache if so; an operation that
 * changes a queue otherwise than by a store forgets its entry (or all of them),
 * and so does every rollback. A store to a cached queue then costs no statement
 * at all until its chunk is written. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "backend.h"
#include "hash.h"

#define SCHEMA_VERSION 5
#define APPLICATION_ID 0x4f464c53 /* "OFLS" */

enum {
	ST_BEGIN, ST_COMMIT, ST_ROLLBACK,
	ST_QUEUE_GET, ST_QUEUE_NEW, ST_QUEUE_ADD, ST_QUEUE_SUB, ST_QUEUE_DROP, ST_QUEUE_DROP_IF_EMPTY,
	ST_QUEUE_DROP_EMPTY, ST_ID_BUMP, ST_ID_GET, ST_MSG_INSERT, ST_MSG_SCAN, ST_MSG_LIST,
	ST_MSG_DEL_UPTO,
	ST_USER_DEL_MSGS, ST_HOST_DEL_MSGS, ST_HOST_DEL_QUEUE, ST_DATA_VERSION,
	ST_EXPIRED_SUB, ST_EXPIRED_DEL, ST_OLDER_SUB, ST_OLDER_DEL, ST_USERS,
	ST_DEDUP_FIND, ST_MSG_LEASE, ST_MSG_DEL_EXPIRED_UPTO, ST_HELD, ST_RELEASE, ST_RELEASE_ALL,
	ST_RENEW, ST_MSG_SUM_IDS, ST_MSG_DEL_IDS,
	ST__COUNT
};

#define ITEM_COLUMNS "id, ts, expire, sender, stanza, meta, lease_owner, lease_until"
#define NOT_SET_ASIDE "AND meta IS NOT CAST('" OS_SET_ASIDE "' AS BLOB)"
/* remove's (and so confirm's): up to 32 ids, in ?2 to ?33 (NULL where unused); IDS_PER_STMT
 * of them at a time (the fuzzer builds with fewer, so that its lists cross statements) */
#ifndef OS_SQLITE_IDS_PER_STMT
#define OS_SQLITE_IDS_PER_STMT 32
#endif
#define IDS_MAX 32
#define IDS_PER_STMT (OS_SQLITE_IDS_PER_STMT < IDS_MAX ? OS_SQLITE_IDS_PER_STMT : IDS_MAX)
#define IDS_IN "WHERE qid = ?1 AND id IN (?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, " \
	"?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, " \
	"?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33)"
#define OWNER_PREFIX "WHERE lease_owner IS NOT NULL AND (?2 = 0 OR substr(lease_owner, 1, ?2) = ?1)"

/* Parameters: ?1 host, ?2 user where a statement finds a queue by its key;
 * ?1 the queue id (qid) where it has it already (store, pop, remove). */
static const char *const sql_text[ST__COUNT] = {
	[ST_BEGIN] = "BEGIN IMMEDIATE",
	[ST_COMMIT] = "COMMIT",
	[ST_ROLLBACK] = "ROLLBACK",
	[ST_QUEUE_GET] = "SELECT id, count, bytes FROM queue WHERE host = ?1 AND user = ?2",
	[ST_QUEUE_NEW] = "INSERT INTO queue(host, user, count, bytes) VALUES (?1, ?2, 1, ?3)",
	[ST_QUEUE_ADD] = "UPDATE queue SET count = count + ?2, bytes = bytes + ?3 WHERE id = ?1",
	[ST_QUEUE_SUB] = "UPDATE queue SET count = count - ?2, bytes = bytes - ?3 WHERE id = ?1",
	[ST_QUEUE_DROP] = "DELETE FROM queue WHERE id = ?1",
	[ST_QUEUE_DROP_IF_EMPTY] = "DELETE FROM queue WHERE id = ?1 AND count <= 0",
	[ST_QUEUE_DROP_EMPTY] = "DELETE FROM queue WHERE count <= 0",
	/* Read once per transaction and written back once before its commit
	 * (see next_id): a batch of stores costs two statements, not two each. */
	[ST_ID_BUMP] = "UPDATE sequence SET value = ?1 WHERE name = 'message'",
	[ST_ID_GET] = "SELECT value FROM sequence WHERE name = 'message'",
	[ST_MSG_INSERT] =
		"INSERT INTO message(qid, id, ts, expire, sender, stanza, meta, dedup) "
		"VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
	[ST_MSG_SCAN] =
		"SELECT " ITEM_COLUMNS " FROM message WHERE qid = ?1 ORDER BY id",
	/* (outside a transaction: one statement, so one consistent read) */
	[ST_MSG_LIST] =
		"SELECT " ITEM_COLUMNS " FROM message "
		"WHERE qid = (SELECT id FROM queue WHERE host = ?1 AND user = ?2) AND id > ?3 ORDER BY id",
	/* (rows set aside stay: see OS_SET_ASIDE) */
	[ST_MSG_DEL_UPTO] = "DELETE FROM message WHERE qid = ?1 AND id <= ?2 " NOT_SET_ASIDE,
	[ST_USER_DEL_MSGS] = "DELETE FROM message WHERE qid = ?1",
	[ST_HOST_DEL_MSGS] = "DELETE FROM message WHERE qid IN (SELECT id FROM queue WHERE host = ?1)",
	[ST_HOST_DEL_QUEUE] = "DELETE FROM queue WHERE host = ?1",
	[ST_EXPIRED_SUB] =
		"UPDATE queue SET count = queue.count - g.c, bytes = queue.bytes - g.b FROM "
		"(SELECT qid, count(*) AS c, sum(length(stanza)) AS b FROM message "
		" WHERE expire <= ?1 GROUP BY qid) AS g "
		"WHERE queue.id = g.qid",
	[ST_EXPIRED_DEL] = "DELETE FROM message WHERE expire <= ?1",
	[ST_OLDER_SUB] =
		"UPDATE queue SET count = queue.count - g.c, bytes = queue.bytes - g.b FROM "
		"(SELECT qid, count(*) AS c, sum(length(stanza)) AS b FROM message "
		" WHERE ts < ?1 GROUP BY qid) AS g "
		"WHERE queue.id = g.qid",
	[ST_OLDER_DEL] = "DELETE FROM message WHERE ts < ?1",
	[ST_USERS] = "SELECT user, count, bytes FROM queue WHERE host = ?1 ORDER BY user",
	[ST_DATA_VERSION] = "PRAGMA data_version",
	/* ?2 the key (the unique index message_dedup) */
	[ST_DEDUP_FIND] = "SELECT 1 FROM message WHERE qid = ?1 AND dedup = ?2",
	/* lease's: the rows from ?2 to ?3 it read and took (free, not expired at ?6,
	 * not set aside) get owner ?4 until ?5 */
	[ST_MSG_LEASE] = "UPDATE message SET lease_owner = ?4, lease_until = ?5 "
	                 "WHERE qid = ?1 AND id >= ?2 AND id <= ?3 "
	                 "AND (lease_owner IS NULL OR lease_until <= ?6) "
	                 "AND (expire IS NULL OR expire > ?6) " NOT_SET_ASIDE,
	[ST_MSG_DEL_EXPIRED_UPTO] = "DELETE FROM message WHERE qid = ?1 AND id <= ?2 "
	                            "AND expire <= ?3 " NOT_SET_ASIDE,
	/* ?2 now, ?3 the owner whose leases do not count (NULL: none) */
	[ST_HELD] = "SELECT max(lease_until) FROM message WHERE qid = ?1 AND lease_owner IS NOT NULL "
	            "AND lease_until > ?2 AND (?3 IS NULL OR lease_owner IS NOT ?3) "
	            "AND (expire IS NULL OR expire > ?2)",
	[ST_RELEASE] = "UPDATE message SET lease_owner = NULL, lease_until = NULL "
	               "WHERE qid = (SELECT id FROM queue WHERE host = ?1 AND user = ?2) "
	               "AND lease_owner = ?3",
	/* ?1 a prefix of the owner (a BLOB, so substr counts bytes), ?2 its length
	 * (substr of an empty BLOB is NULL: the empty prefix is tested apart) */
	[ST_RELEASE_ALL] = "UPDATE message SET lease_owner = NULL, lease_until = NULL " OWNER_PREFIX,
	[ST_RENEW] = "UPDATE message SET lease_until = ?3 " OWNER_PREFIX,
	[ST_MSG_SUM_IDS] = "SELECT count(*), sum(length(stanza)) FROM message " IDS_IN,
	[ST_MSG_DEL_IDS] = "DELETE FROM message " IDS_IN,
};

/* ts has no index: only delete_older_than (an operator's purge) reads it, and
 * an index would cost a page write on every store. */
static const char schema_v1[] =
	"CREATE TABLE message ("
	" host TEXT NOT NULL, user TEXT NOT NULL, id INTEGER NOT NULL,"
	" ts INTEGER NOT NULL, expire INTEGER,"
	" sender TEXT NOT NULL, stanza BLOB NOT NULL, meta BLOB,"
	" PRIMARY KEY (host, user, id)) WITHOUT ROWID;"
	"CREATE INDEX message_expire ON message(expire) WHERE expire IS NOT NULL;"
	"CREATE TABLE queue ("
	" host TEXT NOT NULL, user TEXT NOT NULL,"
	" count INTEGER NOT NULL, bytes INTEGER NOT NULL,"
	" PRIMARY KEY (host, user)) WITHOUT ROWID;"
	"CREATE TABLE sequence (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;"
	"INSERT INTO sequence VALUES ('message', 0);";

/* Version 2 changes no table: a row's sender may be a zero-length BLOB, meaning
 * the stanza's own from attribute (see from_in_xml), which version 1 code would
 * read as an empty sender; the version keeps such code off the file. */
static const char schema_v2[] = "";

/* Version 3 moves the messages into a rowid table (see the top of this file).
 * Ids are unique per file (one sequence), so they become the rowid as they are;
 * a file where they are not fails here, rolled back, and is left as it was. */
static const char schema_v3[] =
	"CREATE TABLE message_v3 ("
	" id INTEGER PRIMARY KEY, host TEXT NOT NULL, user TEXT NOT NULL,"
	" ts INTEGER NOT NULL, expire INTEGER,"
	" sender TEXT NOT NULL, stanza BLOB NOT NULL, meta BLOB);"
	"INSERT INTO message_v3(id, host, user, ts, expire, sender, stanza, meta)"
	" SELECT id, host, user, ts, expire, sender, stanza, meta FROM message ORDER BY id;"
	"DROP TABLE message;"
	"ALTER TABLE message_v3 RENAME TO message;"
	"CREATE INDEX message_queue ON message(host, user);"
	"CREATE INDEX message_expire ON message(expire) WHERE expire IS NOT NULL;";

/* Version 4 gives each counter row an integer id and keys the messages by it
 * (see the top of this file). A message without a counter row (which no
 * version writes) gets one, counted from the messages: nothing is dropped. */
static const char schema_v4[] =
	"CREATE TABLE queue_v4 ("
	" id INTEGER PRIMARY KEY AUTOINCREMENT, host TEXT NOT NULL, user TEXT NOT NULL,"
	" count INTEGER NOT NULL, bytes INTEGER NOT NULL, UNIQUE (host, user));"
	"INSERT INTO queue_v4(host, user, count, bytes)"
	" SELECT host, user, count, bytes FROM queue ORDER BY host, user;"
	"INSERT INTO queue_v4(host, user, count, bytes)"
	" SELECT host, user, count(*), sum(length(stanza)) FROM message AS m"
	" WHERE NOT EXISTS (SELECT 1 FROM queue WHERE host = m.host AND user = m.user)"
	" GROUP BY host, user;"
	"CREATE TABLE message_v4 ("
	" id INTEGER PRIMARY KEY, qid INTEGER NOT NULL,"
	" ts INTEGER NOT NULL, expire INTEGER,"
	" sender TEXT NOT NULL, stanza BLOB NOT NULL, meta BLOB);"
	"INSERT INTO message_v4(id, qid, ts, expire, sender, stanza, meta)"
	" SELECT m.id, q.id, m.ts, m.expire, m.sender, m.stanza, m.meta"
	" FROM message AS m JOIN queue_v4 AS q ON q.host = m.host AND q.user = m.user ORDER BY m.id;"
	"DROP TABLE message;"
	"DROP TABLE queue;"
	"ALTER TABLE queue_v4 RENAME TO queue;"
	"ALTER TABLE message_v4 RENAME TO message;"
	"CREATE INDEX message_queue ON message(qid);"
	"CREATE INDEX message_expire ON message(expire) WHERE expire IS NOT NULL;";

/* Version 5 adds leases (owner and until: NULL when free) and the dedup key, unique
 * per queue. Adding columns rewrites no row. Both indexes are partial: a store
 * without a key and a row never leased write no entry in them. */
static const char schema_v5[] =
	"ALTER TABLE message ADD COLUMN lease_owner BLOB;"
	"ALTER TABLE message ADD COLUMN lease_until INTEGER;"
	"ALTER TABLE message ADD COLUMN dedup BLOB;"
	"CREATE UNIQUE INDEX message_dedup ON message(qid, dedup) WHERE dedup IS NOT NULL;"
	"CREATE INDEX message_lease ON message(lease_owner) WHERE lease_owner IS NOT NULL;";

/* Schema migrations: migrations[v] takes a file from version v to v + 1. */
static const char *const migrations[SCHEMA_VERSION] = {
	[0] = schema_v1,
	[1] = schema_v2,
	[2] = schema_v3,
	[3] = schema_v4,
	[4] = schema_v5,
};

/* Group commit defers a batch's writes (see flush_pending): its messages wait
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
 * flush_pending points them there. */
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
	char *arena;
	size_t used, cap;
	/* INSERT and UPDATE statements of k rows, prepared when first needed
	 * ([1] is the statement of one row, prepared at open) */
	sqlite3_stmt *insert[STMT_ROWS + 1], *update[STMT_ROWS + 1];
} pending;

/* The counter cache: a chained hash table of counter rows by (host, user). */
typedef struct centry {
	struct centry *next;
	uint64_t hash;
	int64_t qid, count, bytes;
	size_t host_n, user_n;
	char key[]; /* host, user, back to back */
} centry;

#define CACHE_BUCKETS 4096 /* a power of two */
#define CACHE_MAX 65536    /* entries; a full cache starts over */

typedef struct {
	centry **bucket; /* CACHE_BUCKETS of them once anything is cached */
	size_t n;
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

static int sqfail(os_store *s, sqlite3 *db) {
	return os_fail(s, sqlite3_extended_errcode(db), "%s", sqlite3_errmsg(db));
}

/* A statement ready for binding. Resetting here (as well as after use)
 * makes the backend safe to re-enter after an emit callback raised. */
static sqlite3_stmt *stmt(sq *q, int which) {
	sqlite3_stmt *st = q->st[which];
	sqlite3_reset(st);
	return st;
}

/* Strings are bound by the 64-bit calls, which take a length as it is: one over
 * sqlite's limit (a billion bytes unless built otherwise) is refused with
 * SQLITE_TOOBIG, never cut. Every bind of a string is checked: SQLITE_OK or the
 * error (the connection's error message says which). */
static int bind_text(sqlite3_stmt *st, int i, os_str v) {
	return sqlite3_bind_text64(st, i, v.p, (sqlite3_uint64)v.n, SQLITE_STATIC, SQLITE_UTF8);
}

static int bind_blob(sqlite3_stmt *st, int i, os_str v) {
	return sqlite3_bind_blob64(st, i, v.p, (sqlite3_uint64)v.n, SQLITE_STATIC);
}

static int bind_key(sqlite3_stmt *st, const os_key *k) {
	int rc = bind_text(st, 1, k->host);
	return rc == SQLITE_OK ? bind_text(st, 2, k->user) : rc;
}

/* Runs a statement that returns no rows; SQLITE_DONE on success. */
static int run(sqlite3_stmt *st) {
	int rc = sqlite3_step(st);
	sqlite3_reset(st);
	return rc;
}

static void cache_clear(ccache *c) {
	size_t i;
	for (i = 0; c->bucket && c->n > 0 && i < CACHE_BUCKETS; i++) {
		centry *e = c->bucket[i], *next;
		for (; e; e = next) {
			next = e->next;
			free(e);
		}
		c->bucket[i] = NULL;
	}
	c->n = 0;
}

/* The slot pointing at k's entry, or at the NULL ending its chain. */
static centry **cache_slot(ccache *c, const os_key *k, uint64_t h) {
	centry **slot = &c->bucket[h & (CACHE_BUCKETS - 1)];
	for (; *slot; slot = &(*slot)->next)
		if ((*slot)->hash == h && os_key_is((*slot)->key, (*slot)->host_n, (*slot)->user_n, k))
			break;
	return slot;
}

static centry *cache_find(ccache *c, const os_key *k, uint64_t h) {
	return c->bucket ? *cache_slot(c, k, h) : NULL;
}

/* Caches a counter row (out of memory: it is just not cached). */
static void cache_put(ccache *c, const os_key *k, uint64_t h, int64_t qid, int64_t count,
                      int64_t bytes) {
	centry *e;
	if (!c->bucket && !(c->bucket = calloc(CACHE_BUCKETS, sizeof *c->bucket)))
		return;
	if (c->n >= CACHE_MAX)
		cache_clear(c);
	if (!(e = malloc(sizeof *e + k->host.n + k->user.n)))
		return;
	e->hash = h, e->qid = qid, e->count = count, e->bytes = bytes;
	e->host_n = k->host.n, e->user_n = k->user.n;
	os_key_copy(e->key, k);
	e->next = c->bucket[h & (CACHE_BUCKETS - 1)];
	c->bucket[h & (CACHE_BUCKETS - 1)] = e;
	c->n++;
}

/* Forgets k's counter row, before an operation that changes it. */
static void cache_drop(ccache *c, const os_key *k) {
	centry **slot, *e;
	if (!c->bucket)
		return;
	slot = cache_slot(c, k, os_key_hash(k));
	if ((e = *slot)) {
		*slot = e->next;
		free(e);
		c->n--;
	}
}

/* Forgets what the open transaction did (sqlite may have rolled it back
 * already): the writes it deferred, and the counters cached since, which may
 * count its stores. */
static void forget_tx(sq *q) {
	q->pend.n_msg = q->pend.n_queue = 0;
	q->pend.used = 0;
	if (q->pend.cap > ARENA_KEEP) {
		free(q->pend.arena);
		q->pend.arena = NULL, q->pend.cap = 0;
	}
	cache_clear(&q->cache);
}

/* Rolls back the open transaction, if any, and resets any statement left
 * stepping (both left by a call abandoned when an emit callback raised: a read
 * statement left active would hold on to its snapshot). */
static void rollback(sq *q) {
	sqlite3_stmt *st = NULL;
	while ((st = sqlite3_next_stmt(q->db, st)))
		if (sqlite3_stmt_busy(st))
			sqlite3_reset(st);
	if (!sqlite3_get_autocommit(q->db) || q->pend.n_msg > 0) {
		forget_tx(q);
		if (!sqlite3_get_autocommit(q->db))
			run(stmt(q, ST_ROLLBACK));
	}
}

static int abort_tx(os_store *s, sq *q);

/* Starts a write transaction, first rolling back one left open by a call
 * that was abandoned (an emit callback raised); forgets the counter cache
 * when another connection has written since the last one. */
static int begin(os_store *s, sq *q) {
	sqlite3_stmt *st;
	int rc;
	q->id_read = q->id_dirty = 0;
	rollback(q);
	if (run(stmt(q, ST_BEGIN)) != SQLITE_DONE)
		return sqfail(s, q->db);
	st = stmt(q, ST_DATA_VERSION);
	if ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		int64_t v = sqlite3_column_int64(st, 0);
		if (v != q->cache.data_version)
			cache_clear(&q->cache);
		q->cache.data_version = v;
	}
	sqlite3_reset(st);
	if (rc != SQLITE_ROW)
		return abort_tx(s, q);
	return OS_OK;
}

/* Records the failure, then rolls back (which may change the error). */
static int abort_tx(os_store *s, sq *q) {
	sqfail(s, q->db);
	forget_tx(q);
	rollback(q);
	return OS_FAIL;
}

static int flush_pending(sq *q);

static int commit(os_store *s, sq *q) {
	if (flush_pending(q) != SQLITE_DONE)
		return abort_tx(s, q);
	if (q->id_dirty) {
		sqlite3_stmt *st = stmt(q, ST_ID_BUMP);
		sqlite3_bind_int64(st, 1, q->last_id);
		if (run(st) != SQLITE_DONE)
			return abort_tx(s, q);
	}
	q->id_read = q->id_dirty = 0;
	if (run(stmt(q, ST_COMMIT)) != SQLITE_DONE)
		return abort_tx(s, q);
	return OS_OK;
}

/* The next message id, inside the open write transaction (which holds the
 * lock on the sequence row until commit() writes the last one back). */
static int next_id(sq *q, int64_t *id) {
	if (!q->id_read) {
		sqlite3_stmt *st = stmt(q, ST_ID_GET);
		int rc = sqlite3_step(st);
		if (rc != SQLITE_ROW) {
			sqlite3_reset(st);
			return rc == SQLITE_DONE ? SQLITE_CORRUPT : rc;
		}
		q->last_id = sqlite3_column_int64(st, 0);
		sqlite3_reset(st);
		q->id_read = 1;
	}
	*id = ++q->last_id;
	q->id_dirty = 1;
	return SQLITE_OK;
}

/* Reads the counter row: its id (0 when there is none: an empty queue), the
 * count and the bytes. */
static int queue_get(sq *q, const os_key *k, int64_t *qid, int64_t *count, int64_t *bytes) {
	sqlite3_stmt *st = stmt(q, ST_QUEUE_GET);
	int rc;
	*qid = *count = *bytes = 0;
	if ((rc = bind_key(st, k)) != SQLITE_OK)
		return rc;
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*qid = sqlite3_column_int64(st, 0);
		*count = sqlite3_column_int64(st, 1);
		*bytes = sqlite3_column_int64(st, 2);
		rc = SQLITE_DONE;
	}
	sqlite3_reset(st);
	return rc;
}

/* Runs a statement whose ?1 is a queue id; SQLITE_DONE on success. */
static int run_qid(sq *q, int which, int64_t qid) {
	sqlite3_stmt *st = stmt(q, which);
	sqlite3_bind_int64(st, 1, qid);
	return run(st);
}

/* Subtracts from the counter row and drops it when it reaches zero. */
static int queue_sub(sq *q, int64_t qid, int64_t count, int64_t bytes) {
	sqlite3_stmt *st;
	int rc;
	if (count == 0)
		return SQLITE_DONE;
	st = stmt(q, ST_QUEUE_SUB);
	sqlite3_bind_int64(st, 1, qid);
	sqlite3_bind_int64(st, 2, count);
	sqlite3_bind_int64(st, 3, bytes);
	if ((rc = run(st)) != SQLITE_DONE)
		return rc;
	return run_qid(q, ST_QUEUE_DROP_IF_EMPTY, qid);
}

/* Counts a message of `bytes` into the counter row `*qid`, creating the row
 * (and setting *qid) when there is none. */
static int queue_add(sq *q, const os_key *k, int64_t *qid, int64_t bytes) {
	sqlite3_stmt *st;
	int rc;
	if (*qid != 0) {
		st = stmt(q, ST_QUEUE_ADD);
		sqlite3_bind_int64(st, 1, *qid);
		sqlite3_bind_int64(st, 2, 1);
		sqlite3_bind_int64(st, 3, bytes);
		return run(st);
	}
	st = stmt(q, ST_QUEUE_NEW);
	if ((rc = bind_key(st, k)) != SQLITE_OK)
		return rc;
	sqlite3_bind_int64(st, 3, bytes);
	if ((rc = run(st)) == SQLITE_DONE)
		*qid = sqlite3_last_insert_rowid(q->db);
	return rc;
}

/* The sender is nearly always the stanza's own from attribute: storing it
 * again would cost a fifth of the row. Such a sender is stored as a
 * zero-length BLOB (a real sender, even an empty one, is TEXT) and read back
 * from the XML. from_in_xml finds from='...' (or "...") on the top element of
 * XML as util.stanza writes it; values with an entity are never elided, so
 * what it returns is the raw value, pointing into xml. 1 if found. */
static int from_in_xml(os_str xml, os_str *from) {
	const char *p = xml.p, *end = xml.p + xml.n;
	if (p == end || *p++ != '<')
		return 0;
	while (p < end && *p != ' ' && *p != '/' && *p != '>') /* the element name */
		p++;
	while (p < end && *p == ' ') {
		const char *name = ++p, *value;
		size_t namelen;
		char quote;
		while (p < end && *p != '=' && *p != ' ' && *p != '>')
			p++;
		if (p + 1 >= end || *p != '=' || (p[1] != '\'' && p[1] != '"'))
			return 0;
		namelen = (size_t)(p - name);
		quote = p[1];
		value = p += 2;
		if (!(p = memchr(value, quote, (size_t)(end - value))) ||
		    memchr(value, '&', (size_t)(p - value)) || memchr(value, '<', (size_t)(p - value)))
			return 0; /* unterminated, or an entity: not the simple form */
		if (namelen == 4 && memcmp(name, "from", 4) == 0) {
			from->p = value;
			from->n = (size_t)(p - value);
			return 1;
		}
		p++;
	}
	return 0;
}

/* Binds a message row to ?(base + 1) .. ?(base + 8) of an insert; SQLITE_OK or
 * the error. */
static int bind_row(sqlite3_stmt *st, int base, const msg_row *r) {
	int rc = SQLITE_OK;
	sqlite3_bind_int64(st, base + 1, r->qid);
	sqlite3_bind_int64(st, base + 2, r->id);
	sqlite3_bind_int64(st, base + 3, r->ts);
	if (r->expire == OS_NONE)
		sqlite3_bind_null(st, base + 4);
	else
		sqlite3_bind_int64(st, base + 4, r->expire);
	if (r->own_from)
		sqlite3_bind_zeroblob(st, base + 5, 0); /* the stanza's own: read back from it */
	else
		rc = bind_text(st, base + 5, r->from);
	if (rc == SQLITE_OK)
		rc = bind_blob(st, base + 6, r->xml);
	if (rc == SQLITE_OK && r->meta.p)
		rc = bind_blob(st, base + 7, r->meta);
	else if (rc == SQLITE_OK)
		sqlite3_bind_null(st, base + 7);
	if (rc == SQLITE_OK && r->dedup.p)
		rc = bind_blob(st, base + 8, r->dedup);
	else if (rc == SQLITE_OK)
		sqlite3_bind_null(st, base + 8);
	return rc;
}

/* The statement that inserts (or counts in) k <= STMT_ROWS rows: one pass
 * through sqlite's virtual machine for k rows of a batch. */
static sqlite3_stmt *rows_stmt(sq *q, int update, int k) {
	sqlite3_stmt **slot = update ? &q->pend.update[k] : &q->pend.insert[k];
	const char *head = update
		? "UPDATE queue SET count = count + v.column2, bytes = bytes + v.column3 FROM (VALUES "
		: "INSERT INTO message(qid, id, ts, expire, sender, stanza, meta, dedup) VALUES ";
	const char *row = update ? "(?,?,?)" : "(?,?,?,?,?,?,?,?)";
	const char *tail = update ? ") AS v WHERE queue.id = v.column1" : "";
	char sql[96 + STMT_ROWS * 18 + 40];
	size_t n;
	int i;
	if (k == 1)
		return stmt(q, update ? ST_QUEUE_ADD : ST_MSG_INSERT);
	if (*slot) {
		sqlite3_reset(*slot);
		return *slot;
	}
	n = (size_t)snprintf(sql, sizeof sql, "%s", head);
	for (i = 0; i < k; i++)
		n += (size_t)snprintf(sql + n, sizeof sql - n, "%s%s", i ? "," : "", row);
	snprintf(sql + n, sizeof sql - n, "%s", tail);
	if (sqlite3_prepare_v3(q->db, sql, -1, SQLITE_PREPARE_PERSISTENT, slot, NULL) != SQLITE_OK)
		return NULL;
	return *slot;
}

/* Writes n deferred rows of the batch, STMT_ROWS per statement: messages, or
 * (update) counter increments. SQLITE_DONE or the error. */
static int write_rows(sq *q, int update, int n) {
	pending *p = &q->pend;
	sqlite3_stmt *st;
	int at, i, k, rc;
	for (at = 0; at < n; at += k) {
		k = n - at < STMT_ROWS ? n - at : STMT_ROWS;
		if (!(st = rows_stmt(q, update, k)))
			return sqlite3_errcode(q->db);
		for (i = 0; i < k; i++) {
			if (update) {
				const pend_queue *pq = &p->queue[at + i];
				sqlite3_bind_int64(st, 3 * i + 1, pq->qid);
				sqlite3_bind_int64(st, 3 * i + 2, pq->count);
				sqlite3_bind_int64(st, 3 * i + 3, pq->bytes);
			} else {
				msg_row *r = &p->msg[at + i];
				r->xml.p = p->arena + r->xml_at;
				r->from.p = p->arena + r->from_at; /* (unused when own_from) */
				r->meta.p = r->meta_at < 0 ? NULL : p->arena + r->meta_at;
				r->dedup.p = r->dedup_at < 0 ? NULL : p->arena + r->dedup_at;
				if ((rc = bind_row(st, 8 * i, r)) != SQLITE_OK)
					return rc;
			}
		}
		if ((rc = run(st)) != SQLITE_DONE)
			return rc;
	}
	return SQLITE_DONE;
}

/* Writes what the batch deferred: its messages, then the sums of its counter
 * increments. SQLITE_DONE or the error. */
static int flush_pending(sq *q) {
	pending *p = &q->pend;
	int rc = write_rows(q, 0, p->n_msg);
	if (rc == SQLITE_DONE)
		rc = write_rows(q, 1, p->n_queue);
	p->n_msg = p->n_queue = 0;
	p->used = 0;
	if (p->cap > ARENA_KEEP) { /* a chunk of big stanzas: give the memory back */
		free(p->arena);
		p->arena = NULL, p->cap = 0;
	}
	return rc;
}

/* Copies n bytes into the arena; their offset, or -1 when out of memory.
 * (The arena exists after any call, so that no pointer into it is NULL.) */
static long long arena_add(pending *p, const char *data, size_t n) {
	size_t at = p->used;
	if (!p->arena || p->cap - p->used < n) {
		size_t cap = p->cap ? p->cap : 16384;
		char *grown;
		while (cap - p->used < n)
			cap *= 2;
		if (!(grown = realloc(p->arena, cap)))
			return -1;
		p->arena = grown, p->cap = cap;
	}
	if (n > 0)
		memcpy(p->arena + at, data, n);
	p->used += n;
	return (long long)at;
}

/* The batch's pending increment of queue qid, or NULL. */
static pend_queue *pending_queue(pending *p, int64_t qid) {
	int i;
	for (i = 0; i < p->n_queue; i++)
		if (p->queue[i].qid == qid)
			return &p->queue[i];
	return NULL;
}

/* A failed store rolls back its transaction: inside a batch, the whole batch. */
static int store_abort(os_store *s, sq *q) {
	s->in_batch = 0;
	return abort_tx(s, q);
}

/* Defers a batch's store of row r (counted into an existing queue when `add`):
 * copies its strings into the arena, and writes the chunk once it is full. */
static int defer_store(os_store *s, sq *q, msg_row *r, int add) {
	pending *p = &q->pend;
	int oom = (r->xml_at = arena_add(p, r->xml.p, r->xml.n)) < 0;
	r->from_at = r->meta_at = 0;
	if (!r->own_from)
		oom |= (r->from_at = arena_add(p, r->from.p, r->from.n)) < 0;
	if (r->meta.p)
		oom |= (r->meta_at = arena_add(p, r->meta.p, r->meta.n)) < 0;
	else
		r->meta_at = -1;
	if (r->dedup.p)
		oom |= (r->dedup_at = arena_add(p, r->dedup.p, r->dedup.n)) < 0;
	else
		r->dedup_at = -1;
	if (oom) {
		s->in_batch = 0;
		rollback(q);
		return os_fail(s, SQLITE_NOMEM, "out of memory");
	}
	p->msg[p->n_msg++] = *r;
	if (add) {
		pend_queue *pq = pending_queue(p, r->qid);
		if (!pq) {
			pq = &p->queue[p->n_queue++];
			pq->qid = r->qid, pq->count = pq->bytes = 0;
		}
		pq->count++;
		pq->bytes += (int64_t)r->xml.n;
	}
	if ((p->n_msg == CHUNK || p->used >= ARENA_KEEP) && flush_pending(q) != SQLITE_DONE)
		return store_abort(s, q);
	return OS_OK;
}

/* Whether queue qid holds a row with dedup key d, among the rows the batch holds
 * back and in the file: SQLITE_ROW if so, SQLITE_DONE if not, or the error. */
static int dedup_held(sq *q, int64_t qid, os_str d) {
	const pending *p = &q->pend;
	sqlite3_stmt *st;
	int i, rc;
	for (i = 0; i < p->n_msg; i++) {
		const msg_row *r = &p->msg[i];
		if (r->qid == qid && r->dedup_at >= 0 && r->dedup.n == d.n &&
		    memcmp(p->arena + r->dedup_at, d.p, d.n) == 0)
			return SQLITE_ROW;
	}
	st = stmt(q, ST_DEDUP_FIND);
	sqlite3_bind_int64(st, 1, qid);
	if ((rc = bind_blob(st, 2, d)) != SQLITE_OK)
		return rc;
	rc = sqlite3_step(st);
	sqlite3_reset(st);
	return rc;
}

/* In a batch (s->in_batch) the store joins the open transaction: it neither
 * begins nor commits, and a refusal by the limit leaves the batch as it was
 * (the refusal is decided before anything is written). The batch's rows are
 * written a chunk at a time (defer_store); the limit counts them meanwhile. */
static int sq_store(os_store *s, const os_key *k, const os_item *m, const os_limit *lim,
                    int64_t *count, int64_t *id) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	msg_row r;
	int64_t bytes;
	uint64_t h = os_key_hash(k);
	centry *cached;
	os_str own;
	int add, rc = OS_OK;
	if (!s->in_batch && begin(s, q) != OS_OK)
		return OS_FAIL;
	if ((cached = cache_find(&q->cache, k, h))) {
		r.qid = cached->qid, *count = cached->count, bytes = cached->bytes;
	} else {
		if (queue_get(q, k, &r.qid, count, &bytes) != SQLITE_DONE)
			return store_abort(s, q);
		if (s->in_batch && r.qid != 0) {
			const pend_queue *pq = pending_queue(&q->pend, r.qid);
			if (pq)
				*count += pq->count, bytes += pq->bytes;
		}
	}
	if (m->dedup.p && r.qid != 0 && (rc = dedup_held(q, r.qid, m->dedup)) != SQLITE_DONE) {
		if (rc != SQLITE_ROW)
			return store_abort(s, q);
		rc = OS_DUP;
	} else if ((lim->max_count != OS_NONE && *count + 1 > lim->max_count) ||
	           (lim->max_bytes != OS_NONE && bytes + (int64_t)m->xml.n > lim->max_bytes)) {
		rc = OS_LIMIT;
	}
	if (rc == OS_DUP || rc == OS_LIMIT) {
		if (!s->in_batch)
			run(stmt(q, ST_ROLLBACK)); /* (it wrote nothing) */
		return rc;
	}
	if (next_id(q, id) != SQLITE_OK)
		return store_abort(s, q);
	r.id = *id, r.ts = m->ts, r.expire = m->expire;
	r.from = m->from, r.xml = m->xml, r.meta = m->meta, r.dedup = m->dedup;
	r.own_from = m->from.n > 0 && from_in_xml(m->xml, &own) && own.n == m->from.n &&
	             memcmp(own.p, m->from.p, own.n) == 0;
	*count += 1;
	/* a new queue's counter row is written at once: its id is the messages' key */
	add = s->in_batch && r.qid != 0;
	if (!add && queue_add(q, k, &r.qid, (int64_t)m->xml.n) != SQLITE_DONE)
		return store_abort(s, q);
	if (cached) /* (as the transaction will leave it; a rollback forgets it) */
		cached->count = *count, cached->bytes = bytes + (int64_t)m->xml.n;
	else if (r.qid != 0)
		cache_put(&q->cache, k, h, r.qid, *count, bytes + (int64_t)m->xml.n);
	if (s->in_batch)
		return defer_store(s, q, &r, add);
	st = stmt(q, ST_MSG_INSERT);
	if (bind_row(st, 0, &r) != SQLITE_OK || run(st) != SQLITE_DONE)
		return store_abort(s, q);
	return commit(s, q);
}

static os_str column_str(sqlite3_stmt *st, int col) {
	os_str r;
	r.p = sqlite3_column_blob(st, col);
	r.n = (size_t)sqlite3_column_bytes(st, col);
	if (!r.p)
		r.p = "";
	return r;
}

static void read_item(sqlite3_stmt *st, os_item *it) {
	it->id = sqlite3_column_int64(st, 0);
	it->ts = sqlite3_column_int64(st, 1);
	it->expire = sqlite3_column_type(st, 2) == SQLITE_NULL ? OS_NONE
	                                                       : sqlite3_column_int64(st, 2);
	it->xml = column_str(st, 4);
	if (sqlite3_column_type(st, 3) == SQLITE_BLOB && sqlite3_column_bytes(st, 3) == 0) {
		/* elided at store: the stanza's own from='...' (see from_in_xml) */
		if (!from_in_xml(it->xml, &it->from))
			it->from.p = "", it->from.n = 0;
	} else {
		it->from = column_str(st, 3);
	}
	if (sqlite3_column_type(st, 5) == SQLITE_NULL)
		it->meta.p = NULL, it->meta.n = 0;
	else
		it->meta = column_str(st, 5);
	it->dedup.p = NULL, it->dedup.n = 0;
	if (sqlite3_column_type(st, 6) == SQLITE_NULL) {
		it->lease_owner.p = NULL, it->lease_owner.n = 0;
		it->lease_until = 0;
	} else {
		it->lease_owner = column_str(st, 6);
		it->lease_until = sqlite3_column_int64(st, 7);
	}
}

/* The end of the latest live lease on queue qid that is not owner's (owner.p
 * NULL: anybody's), into *held. */
static int held_until(sq *q, int64_t qid, int64_t now, os_str owner, int64_t *held) {
	sqlite3_stmt *st = stmt(q, ST_HELD);
	int rc = SQLITE_OK;
	sqlite3_bind_int64(st, 1, qid);
	sqlite3_bind_int64(st, 2, now);
	if (owner.p)
		rc = bind_blob(st, 3, owner);
	else
		sqlite3_bind_null(st, 3);
	if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
		if (sqlite3_column_type(st, 0) != SQLITE_NULL)
			*held = sqlite3_column_int64(st, 0);
		rc = SQLITE_DONE;
	}
	sqlite3_reset(st);
	return rc;
}

/* pop (owner.p NULL: deletes what it takes) and lease (sets owner and until on
 * it), as backend.h says. Both read the rows in id order under the write lock;
 * what they change is then a range of ids: pop deletes every row up to the last
 * it read but those set aside, lease deletes the expired rows up to there and
 * marks the free ones between the first and the last it took. */
static int take(os_store *s, const os_key *k, os_str owner, int64_t now, int64_t until,
                int64_t max, os_emit_item emit, void *ud, int64_t *expired, int64_t *held) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	int64_t qid, count, bytes, gone_bytes = 0, returned = 0, first = 0, last = 0, last_taken = 0;
	int rc = SQLITE_DONE, stopped = 0;
	*expired = 0;
	*held = OS_NONE;
	/* Cheap read first: the broadcast fires on every login. */
	rollback(q);
	cache_drop(&q->cache, k);
	if (queue_get(q, k, &qid, &count, &bytes) != SQLITE_DONE)
		return sqfail(s, q->db);
	if (count == 0)
		return OS_OK;
	/* (read again under the write lock: another connection may have changed it) */
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	if (queue_get(q, k, &qid, &count, &bytes) != SQLITE_DONE)
		return abort_tx(s, q);
	st = stmt(q, ST_MSG_SCAN);
	sqlite3_bind_int64(st, 1, qid);
	while ((max == OS_NONE || returned < max) && (rc = sqlite3_step(st)) == SQLITE_ROW) {
		os_item it;
		read_item(st, &it);
		if (os_is_set_aside(it.meta))
			continue;
		if (it.expire != OS_NONE && it.expire <= now) {
			(*expired)++;
			gone_bytes += (int64_t)it.xml.n;
			last = it.id;
			continue;
		}
		if (it.lease_owner.p && it.lease_until > now) {
			if (owner.p && it.lease_owner.n == owner.n &&
			    memcmp(it.lease_owner.p, owner.p, owner.n) == 0)
				continue; /* in flight to this owner */
			stopped = 1;
			break;
		}
		it.lease_owner.p = NULL, it.lease_owner.n = 0, it.lease_until = 0;
		returned++;
		if (!first)
			first = it.id;
		last = last_taken = it.id;
		if (!owner.p)
			gone_bytes += (int64_t)it.xml.n;
		emit(ud, &it);
	}
	if (stopped || (max != OS_NONE && returned >= max))
		rc = SQLITE_DONE;
	sqlite3_reset(st);
	if (rc != SQLITE_DONE)
		return abort_tx(s, q);
	if (stopped && returned == 0 && held_until(q, qid, now, owner, held) != SQLITE_DONE)
		return abort_tx(s, q);
	if (owner.p && returned > 0) {
		st = stmt(q, ST_MSG_LEASE);
		sqlite3_bind_int64(st, 1, qid);
		sqlite3_bind_int64(st, 2, first);
		sqlite3_bind_int64(st, 3, last_taken);
		sqlite3_bind_int64(st, 5, until);
		sqlite3_bind_int64(st, 6, now);
		if (bind_blob(st, 4, owner) != SQLITE_OK || run(st) != SQLITE_DONE)
			return abort_tx(s, q);
	}
	if (last > 0 && (*expired > 0 || !owner.p)) {
		/* Inside BEGIN IMMEDIATE nobody else writes, so the rows up to the
		 * last id read are the rows read: pop deletes them but those set
		 * aside, lease the expired ones. */
		st = stmt(q, owner.p ? ST_MSG_DEL_EXPIRED_UPTO : ST_MSG_DEL_UPTO);
		sqlite3_bind_int64(st, 1, qid);
		sqlite3_bind_int64(st, 2, last);
		sqlite3_bind_int64(st, 3, now);
		if (run(st) != SQLITE_DONE ||
		    queue_sub(q, qid, *expired + (owner.p ? 0 : returned), gone_bytes) != SQLITE_DONE)
			return abort_tx(s, q);
	}
	return commit(s, q);
}

/* Runs one of the lease updates whose ?1 is a prefix of the owner; *touched is
 * how many rows it changed. */
static int relet(os_store *s, int which, os_str prefix, int64_t until, int64_t *touched) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	*touched = 0;
	rollback(q);
	st = stmt(q, which);
	sqlite3_bind_int64(st, 2, (int64_t)prefix.n);
	sqlite3_bind_int64(st, 3, until);
	if (bind_blob(st, 1, prefix) != SQLITE_OK || run(st) != SQLITE_DONE)
		return sqfail(s, q->db);
	*touched = sqlite3_changes64(q->db);
	return OS_OK;
}

static int sq_release(os_store *s, const os_key *k, os_str owner, int64_t *touched) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	*touched = 0;
	rollback(q);
	st = stmt(q, ST_RELEASE);
	if (bind_key(st, k) != SQLITE_OK || bind_blob(st, 3, owner) != SQLITE_OK || run(st) != SQLITE_DONE)
		return sqfail(s, q->db);
	*touched = sqlite3_changes64(q->db);
	return OS_OK;
}

static int sq_release_all(os_store *s, const os_str *prefix, int64_t *touched) {
	os_str all = { "", 0 };
	return relet(s, ST_RELEASE_ALL, prefix ? *prefix : all, 0, touched);
}

static int sq_renew(os_store *s, os_str prefix, int64_t until, int64_t *touched) {
	return relet(s, ST_RENEW, prefix, until, touched);
}

static int sq_count(os_store *s, const os_key *k, int64_t *count, int64_t *bytes) {
	sq *q = s->impl;
	int64_t qid;
	rollback(q);
	if (queue_get(q, k, &qid, count, bytes) != SQLITE_DONE)
		return sqfail(s, q->db);
	return OS_OK;
}

static int sq_list(os_store *s, const os_key *k, int64_t after_id, int64_t max,
                   os_emit_item emit, void *ud) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	int64_t n = 0;
	int rc = SQLITE_DONE;
	rollback(q);
	st = stmt(q, ST_MSG_LIST);
	if (bind_key(st, k) != SQLITE_OK)
		return sqfail(s, q->db);
	sqlite3_bind_int64(st, 3, after_id);
	while ((max == OS_NONE || n < max) && (rc = sqlite3_step(st)) == SQLITE_ROW) {
		os_item it;
		read_item(st, &it);
		n++;
		emit(ud, &it);
	}
	if (rc == SQLITE_ROW)
		rc = SQLITE_DONE;
	sqlite3_reset(st);
	if (rc != SQLITE_DONE)
		return sqfail(s, q->db);
	return OS_OK;
}

static int sq_remove(os_store *s, const os_key *k, const int64_t *ids, size_t n,
                     int64_t *touched) {
	sq *q = s->impl;
	int64_t qid, count, bytes = 0;
	size_t i;
	*touched = 0;
	cache_drop(&q->cache, k);
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	if (queue_get(q, k, &qid, &count, &bytes) != SQLITE_DONE)
		return abort_tx(s, q);
	bytes = 0;
	/* IDS_PER_STMT ids at a time: what they hold is counted, then deleted (a
	 * page confirmed costs a few statements, not one per row) */
	for (i = 0; qid != 0 && i < n; i += IDS_PER_STMT) {
		sqlite3_stmt *sum = stmt(q, ST_MSG_SUM_IDS), *del = stmt(q, ST_MSG_DEL_IDS);
		size_t j;
		int rc;
		sqlite3_bind_int64(sum, 1, qid);
		sqlite3_bind_int64(del, 1, qid);
		for (j = 0; j < IDS_MAX; j++) {
			if (j < IDS_PER_STMT && i + j < n) {
				sqlite3_bind_int64(sum, (int)j + 2, ids[i + j]);
				sqlite3_bind_int64(del, (int)j + 2, ids[i + j]);
			} else {
				sqlite3_bind_null(sum, (int)j + 2);
				sqlite3_bind_null(del, (int)j + 2);
			}
		}
		if ((rc = sqlite3_step(sum)) == SQLITE_ROW) {
			*touched += sqlite3_column_int64(sum, 0);
			bytes += sqlite3_column_int64(sum, 1);
			rc = SQLITE_DONE;
		}
		sqlite3_reset(sum);
		if (rc != SQLITE_DONE || run(del) != SQLITE_DONE)
			return abort_tx(s, q);
	}
	if (queue_sub(q, qid, *touched, bytes) != SQLITE_DONE)
		return abort_tx(s, q);
	return commit(s, q);
}

static int sq_remove_user(os_store *s, const os_key *k, int64_t *touched) {
	sq *q = s->impl;
	int64_t qid, count, bytes;
	*touched = 0;
	cache_drop(&q->cache, k);
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	if (queue_get(q, k, &qid, &count, &bytes) != SQLITE_DONE)
		return abort_tx(s, q);
	if (qid == 0)
		return commit(s, q);
	if (run_qid(q, ST_USER_DEL_MSGS, qid) != SQLITE_DONE)
		return abort_tx(s, q);
	*touched = sqlite3_changes(q->db);
	if (run_qid(q, ST_QUEUE_DROP, qid) != SQLITE_DONE)
		return abort_tx(s, q);
	return commit(s, q);
}

static int sq_remove_host(os_store *s, os_str host, int64_t *touched) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	cache_clear(&q->cache);
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	st = stmt(q, ST_HOST_DEL_MSGS);
	if (bind_text(st, 1, host) != SQLITE_OK || run(st) != SQLITE_DONE)
		return abort_tx(s, q);
	*touched = sqlite3_changes(q->db);
	st = stmt(q, ST_HOST_DEL_QUEUE);
	if (bind_text(st, 1, host) != SQLITE_OK || run(st) != SQLITE_DONE)
		return abort_tx(s, q);
	return commit(s, q);
}

/* Bulk deletes: fix every affected counter row from one grouped query,
 * delete the rows, then drop emptied counters; all in one transaction. */
static int bulk_delete(os_store *s, int sub, int del, int64_t arg, int64_t *touched) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	cache_clear(&q->cache);
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	st = stmt(q, sub);
	sqlite3_bind_int64(st, 1, arg);
	if (run(st) != SQLITE_DONE)
		return abort_tx(s, q);
	st = stmt(q, del);
	sqlite3_bind_int64(st, 1, arg);
	if (run(st) != SQLITE_DONE)
		return abort_tx(s, q);
	*touched = sqlite3_changes(q->db);
	if (run(stmt(q, ST_QUEUE_DROP_EMPTY)) != SQLITE_DONE)
		return abort_tx(s, q);
	return commit(s, q);
}

static int sq_delete_expired(os_store *s, int64_t now, int64_t *touched) {
	return bulk_delete(s, ST_EXPIRED_SUB, ST_EXPIRED_DEL, now, touched);
}

static int sq_delete_older_than(os_store *s, int64_t cutoff, int64_t *touched) {
	return bulk_delete(s, ST_OLDER_SUB, ST_OLDER_DEL, cutoff, touched);
}

static int sq_users(os_store *s, os_str host, os_emit_user emit, void *ud) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	int rc;
	rollback(q);
	st = stmt(q, ST_USERS);
	if (bind_text(st, 1, host) != SQLITE_OK)
		return sqfail(s, q->db);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW)
		emit(ud, column_str(st, 0), sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2));
	sqlite3_reset(st);
	if (rc != SQLITE_DONE)
		return sqfail(s, q->db);
	return OS_OK;
}

static void sq_free(sq *q) {
	int i;
	if (!q)
		return;
	for (i = 0; i < ST__COUNT; i++)
		sqlite3_finalize(q->st[i]); /* NULL is a harmless no-op */
	for (i = 0; i <= STMT_ROWS; i++) {
		sqlite3_finalize(q->pend.insert[i]);
		sqlite3_finalize(q->pend.update[i]);
	}
	free(q->pend.arena);
	cache_clear(&q->cache);
	free(q->cache.bucket);
	sqlite3_close_v2(q->db);
	free(q);
}

static void sq_close(os_store *s) {
	sq *q = s->impl;
	if (q && q->db && !sqlite3_get_autocommit(q->db))
		sqlite3_exec(q->db, "ROLLBACK", NULL, NULL, NULL);
	sq_free(q);
	s->impl = NULL;
}

/* One BEGIN IMMEDIATE for many stores, one COMMIT (and one WAL sync) for all. */
static int sq_batch_begin(os_store *s) {
	return begin(s, s->impl);
}

static int sq_batch_end(os_store *s, int do_commit) {
	sq *q = s->impl;
	if (sqlite3_get_autocommit(q->db)) { /* the transaction is gone: sqlite rolled it back */
		forget_tx(q);
		return do_commit ? os_fail(s, SQLITE_ABORT, "the batch was rolled back") : OS_OK;
	}
	if (do_commit)
		return commit(s, q);
	rollback(q);
	if (!sqlite3_get_autocommit(q->db))
		return sqfail(s, q->db);
	return OS_OK;
}

static const os_backend sqlite_backend = {
	"sqlite", sq_store, take, sq_release, sq_release_all, sq_renew, sq_count, sq_list, sq_remove, sq_remove_user,
	sq_remove_host, sq_delete_expired, sq_delete_older_than, sq_users, sq_close,
	sq_batch_begin, sq_batch_end,
};

/* Reads one integer pragma; SQLITE_OK or the error. */
static int pragma_int(sqlite3 *db, const char *sql, int64_t *out) {
	sqlite3_stmt *st;
	int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
	if (rc != SQLITE_OK)
		return rc;
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*out = sqlite3_column_int64(st, 0);
		rc = SQLITE_OK;
	}
	sqlite3_finalize(st);
	return rc;
}

/* Brings the schema to SCHEMA_VERSION, refusing files that are not ours
 * or that a newer build wrote. Never drops or rewrites existing data.
 * Reading the version and migrating happen in one write transaction: another
 * process opening the same file at the same moment waits for the lock (the busy
 * timeout) and then reads the schema this one left, instead of migrating the
 * file a second time from a version it read before this one committed. A
 * failure rolls every step back, leaving the file as it was. */
static int check_schema(os_store *s, sqlite3 *db, const char *path) {
	int64_t version = 0, app = 0, tables = 0;
	char sql[96], *err = NULL;
	int rc = OS_FAIL;
	if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK ||
	    pragma_int(db, "PRAGMA application_id", &app) != SQLITE_OK ||
	    pragma_int(db, "PRAGMA user_version", &version) != SQLITE_OK ||
	    pragma_int(db, "SELECT count(*) FROM sqlite_schema", &tables) != SQLITE_OK) {
		os_fail(s, sqlite3_extended_errcode(db), "%s: %s", path, sqlite3_errmsg(db));
		goto done;
	}
	if (tables > 0 && app != APPLICATION_ID) {
		os_fail(s, SQLITE_NOTADB,
		        "%s: not an offline-store database (it holds other tables); refusing to touch it",
		        path);
		goto done;
	}
	if (version > SCHEMA_VERSION) {
		os_fail(s, SQLITE_NOTADB,
		        "%s: schema version %lld was written by a newer offline-store "
		        "(this build knows up to %d); refusing to touch it",
		        path, (long long)version, SCHEMA_VERSION);
		goto done;
	}
	for (; version < SCHEMA_VERSION; version++) {
		snprintf(sql, sizeof sql, "PRAGMA user_version = %lld; PRAGMA application_id = %d;",
		         (long long)version + 1, APPLICATION_ID);
		if (sqlite3_exec(db, migrations[version], NULL, NULL, &err) != SQLITE_OK ||
		    sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
			os_fail(s, sqlite3_extended_errcode(db), "%s: migrating schema to version %lld: %s",
			        path, (long long)version + 1, err ? err : sqlite3_errmsg(db));
			goto done;
		}
	}
	if (sqlite3_exec(db, "COMMIT", NULL, NULL, &err) != SQLITE_OK) {
		os_fail(s, sqlite3_extended_errcode(db), "%s: committing the schema: %s", path,
		        err ? err : sqlite3_errmsg(db));
		goto done;
	}
	rc = OS_OK;
done:
	sqlite3_free(err);
	if (!sqlite3_get_autocommit(db))
		sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
	return rc;
}

/* Switches the file to WAL (a no-op once it is). Leaving rollback mode needs
 * the file to itself for a moment, and sqlite answers "busy" at once, without
 * waiting in the busy handler, when another process is opening or switching
 * the same file just then: so that answer is retried for the busy timeout. */
static int set_wal(sqlite3 *db, int timeout_ms) {
	int rc, waited = 0;
	while ((rc = sqlite3_exec(db, "PRAGMA journal_mode = WAL", NULL, NULL, NULL)) != SQLITE_OK &&
	       (rc & 0xff) == SQLITE_BUSY && waited < timeout_ms) {
		sqlite3_sleep(10);
		waited += 10;
	}
	return rc;
}

static int memstatus_tried;

int os_sqlite_open(os_store *s, const os_sqlite_config *cfg) {
	sq *q = calloc(1, sizeof *q);
	char *mode = NULL;
	int rc, i;
	if (!q)
		return os_fail(s, SQLITE_NOMEM, "out of memory");
	/* sqlite keeps process-wide allocation statistics by default, taking a
	 * mutex on every allocation (Debian builds it without lookaside, so rows
	 * and records are all malloc'd: ~14 a store). Nothing reads them here.
	 * Only possible before sqlite's first use in the process: if another
	 * module got there first, this fails and changes nothing. Tried once. */
	if (!memstatus_tried) {
		memstatus_tried = 1;
		sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
	}
	rc = sqlite3_open_v2(cfg->path, &q->db,
	                     SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
	if (rc != SQLITE_OK) {
		os_fail(s, rc, "%s: %s", cfg->path, q->db ? sqlite3_errmsg(q->db) : sqlite3_errstr(rc));
		goto fail;
	}
	sqlite3_extended_result_codes(q->db, 1);
	sqlite3_busy_timeout(q->db, cfg->busy_timeout_ms);
	if (sqlite3_db_readonly(q->db, "main") == 1) {
		os_fail(s, SQLITE_READONLY, "%s: file is read-only", cfg->path);
		goto fail;
	}
	/* Reading the header first makes a non-database file fail here, before
	 * anything could write to it. */
	if (check_schema(s, q->db, cfg->path) != OS_OK)
		goto fail;
	mode = sqlite3_mprintf("PRAGMA synchronous = %s;", cfg->synchronous_full ? "FULL" : "NORMAL");
	if (set_wal(q->db, cfg->busy_timeout_ms) != SQLITE_OK || !mode ||
	    sqlite3_exec(q->db, mode, NULL, NULL, NULL) != SQLITE_OK) {
		os_fail(s, sqlite3_extended_errcode(q->db), "%s: %s", cfg->path, sqlite3_errmsg(q->db));
		goto fail;
	}
	for (i = 0; i < ST__COUNT; i++) {
		if (sqlite3_prepare_v3(q->db, sql_text[i], -1, SQLITE_PREPARE_PERSISTENT, &q->st[i],
		                       NULL) != SQLITE_OK) {
			os_fail(s, sqlite3_extended_errcode(q->db), "%s: preparing statement %d: %s",
			        cfg->path, i, sqlite3_errmsg(q->db));
			goto fail;
		}
	}
	sqlite3_free(mode);
	s->impl = q;
	s->be = &sqlite_backend;
	return OS_OK;
fail:
	sqlite3_free(mode);
	sq_free(q);
	return OS_FAIL;
}
