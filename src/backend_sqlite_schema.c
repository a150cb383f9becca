/* The sqlite backend's SQL: its statements, its schema and the migrations
 * between versions, open and free.
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
 * "The sqlite backend under group commit"). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_sqlite.h"

#define SCHEMA_VERSION 5
#define APPLICATION_ID 0x4f464c53 /* "OFLS" */

#define ITEM_COLUMNS "id, ts, expire, sender, stanza, meta, lease_owner, lease_until"
#define NOT_SET_ASIDE "AND meta IS NOT CAST('" OS_SET_ASIDE "' AS BLOB)"
#define OWNER_PREFIX "WHERE lease_owner IS NOT NULL AND (?2 = 0 OR substr(lease_owner, 1, ?2) = ?1)"
#define IDS_IN "WHERE qid = ?1 AND id IN (?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, " \
	"?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, " \
	"?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33)"

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
	/* eviction (drop the oldest to make room): the queue's rows from the front,
	 * then the unleased ones up to the last it read */
	[ST_MSG_OLDEST] = "SELECT id, length(stanza), lease_owner IS NOT NULL FROM message "
	                  "WHERE qid = ?1 ORDER BY id",
	[ST_MSG_EVICT] = "DELETE FROM message WHERE qid = ?1 AND id <= ?2 AND lease_owner IS NULL",
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

void sq_free(sq *q) {
	int i;
	if (!q)
		return;
	for (i = 0; i < ST__COUNT; i++)
		sqlite3_finalize(q->st[i]); /* NULL is a harmless no-op */
	for (i = 0; i <= STMT_ROWS; i++) {
		sqlite3_finalize(q->pend.insert[i]);
		sqlite3_finalize(q->pend.update[i]);
	}
	os_buf_free(&q->pend.arena);
	os_table_free(&q->cache.t, centry_free);
	sqlite3_close_v2(q->db);
	free(q);
}

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
