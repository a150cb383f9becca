/* The PostgreSQL backend (libpq): one connection per open store, any number
 * of server nodes on one database. Same shape as the sqlite backend: a
 * per-user counter row in offline_queue (count, bytes) changes in the same
 * transaction as every insert and delete, and every statement is prepared
 * once per connection (again after a reconnect).
 *
 * Concurrency: exact across processes, at READ COMMITTED, without retries.
 *
 * 1. The queue row of a user is that user's lock. Every transaction that
 *    inserts or deletes a user's messages first locks that row: store() by
 *    its upsert (INSERT .. ON CONFLICT DO UPDATE locks the row even when its
 *    WHERE rejects the update), pop/remove/remove_user by SELECT .. FOR
 *    UPDATE, the bulk deletes by one SELECT .. ORDER BY .. FOR UPDATE over
 *    the users they touch. Nobody touches a user's messages without holding
 *    its queue row, so the counter is exact and the limit check reads one
 *    row: `count + 1 <= max` is decided under the lock.
 *
 * 2. store() is one statement (so one transaction, one round trip): the
 *    upsert increments the counter only if the limit allows it and returns
 *    the new count; the message insert selects from the upsert's output, so
 *    it runs only when the upsert returned a row, and draws its id from the
 *    identity sequence after the lock was taken. No row back means "limit";
 *    a new user with max 0 inserts nothing (the INSERT's SELECT is empty).
 *
 * 3. Ids and arrival order. Ids come from one sequence (cache 1), so they
 *    grow across every connection, but two writers may commit them out of
 *    order. Not so for one user: writer B can draw its id only after it got
 *    the row lock, that is after writer A committed, so within a user the
 *    id order is the commit order. A pop locks the row and only then takes
 *    its snapshot (a new statement), so it sees every message committed for
 *    the user and no writer can add one until it commits; `DELETE .. WHERE
 *    id <= last_read` therefore deletes exactly the rows it read. (This is
 *    the race MongooseIM's rdbms backend loses: it deletes all of a user's
 *    rows after its SELECT, including rows another node wrote in between.)
 *    Every counter change subtracts what the DELETE's RETURNING says it
 *    deleted, never what was read.
 *
 * 4. Bulk deletes (remove_host, delete_expired, delete_older_than) are one
 *    statement each. Its snapshot predates its locks, so a store committed
 *    in between is invisible to its DELETE but visible in the locked row's
 *    count: the queue row is dropped only when the locked (current) count
 *    equals what was deleted, otherwise decremented. Locks are taken in
 *    (host, username) order and message rows are only deleted by holders of
 *    their user's lock, so no two transactions can deadlock.
 *
 * 5. Duplicates: a unique index on (host, username, dedup) where dedup is not
 *    null. store() first looks the key up (in its snapshot) and stores
 *    nothing when it is there; a writer that stored the same key meanwhile is
 *    caught by the index (a unique violation on offline_message_dedup), which
 *    store() reports as a duplicate too: exact under any number of writers.
 *
 * 6. Leases: lease() is pop() that marks the rows it took instead of deleting
 *    them, under the same lock of the user's queue row, so two nodes leasing
 *    (or popping) for one user take turns and read each other's leases: the
 *    user's rows go out in order, never to two sessions at once. It marks
 *    exactly the ids it read and returned. release, release_all and renew
 *    only clear or move lease columns (no insert, no delete, no counter), so
 *    they take no queue lock.
 *
 * Failures: runtime errors return OS_FAIL with the server's message and its
 * SQLSTATE as a base-36 number (Lua: tonumber("40P01", 36)); code 0 means
 * the connection is down (lost, unreachable, or refused at open). A lost
 * connection fails the call in flight (its transaction is rolled back by the
 * server, nothing is half-written); the next call reconnects first, at most
 * once per backoff interval, so a dead server does not stall every call.
 *
 * In doubt: a connection lost after COMMIT was sent and before its answer
 * came leaves the outcome unknown. pop, remove and remove_user learn their
 * transaction's id while they hold the user's lock, and then reconnect and
 * ask the server (txid_status) before answering: committed is a success
 * (pop returns what it read), rolled back a failure. store is one statement
 * in its own implicit transaction and is not resolved: if its answer is lost
 * it reports failure although the message may be stored. */
#define _POSIX_C_SOURCE 200809L

#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "backend.h"

#define SCHEMA_VERSION 2
#define SCHEMA_LOCK 1330007123 /* pg_advisory_xact_lock key for schema set-up: "OFLS" */
#define BACKOFF_MIN_MS 250
#define BACKOFF_MAX_MS 8000
#define MAX_PARAMS 10
#define IN_DOUBT_WAIT_MS 3000 /* the longest a lost COMMIT's outcome is waited for */
#define IN_DOUBT_POLL_MS 20

enum {
	ST_QUEUE_GET, ST_QUEUE_LOCK, ST_STORE, ST_SCAN, ST_DEL_UPTO, ST_DEL_IDS, ST_LIST,
	ST_HOST_DEL, ST_EXPIRED_DEL, ST_OLDER_DEL, ST_USERS, ST_POP_DEL,
	ST_LEASE_SET, ST_LEASE_DEL, ST_HELD, ST_RELEASE, ST_RELEASE_ALL, ST_RENEW,
	ST__COUNT
};

/* Deletes a locked user's messages chosen by `filter`, then drops or
 * decrements the counter row by what was really deleted; returns that. */
#define USER_DELETE(filter) \
	"WITH d AS (DELETE FROM offline_message WHERE host = $1::bytea AND username = $2::bytea AND " \
	filter " RETURNING octet_length(stanza) AS b), " \
	"g AS (SELECT count(*) AS c, coalesce(sum(b), 0) AS b FROM d), " \
	"gone AS (DELETE FROM offline_queue q USING g WHERE q.host = $1::bytea " \
	" AND q.username = $2::bytea AND g.c > 0 AND q.count <= g.c), " \
	"kept AS (UPDATE offline_queue q SET count = q.count - g.c, bytes = q.bytes - g.b FROM g " \
	" WHERE q.host = $1::bytea AND q.username = $2::bytea AND g.c > 0 AND q.count > g.c) " \
	"SELECT c::int8 FROM g"

/* The bulk deletes: lock the queue rows of the users `users` selects, in
 * key order; delete their messages that `filter` selects; fix the counters
 * from the locked (current) counts; return how many messages went. */
#define BULK_DELETE(users, filter) \
	"WITH locked AS MATERIALIZED (SELECT host, username, count FROM offline_queue WHERE " users \
	" ORDER BY host, username FOR UPDATE), " \
	"d AS (DELETE FROM offline_message m USING locked l WHERE m.host = l.host " \
	" AND m.username = l.username AND " filter \
	" RETURNING m.host, m.username, octet_length(m.stanza) AS b), " \
	"g AS (SELECT d.host, d.username, count(*) AS c, sum(d.b) AS b, min(l.count) AS had " \
	" FROM d JOIN locked l ON l.host = d.host AND l.username = d.username " \
	" GROUP BY d.host, d.username), " \
	"gone AS (DELETE FROM offline_queue q USING g WHERE q.host = g.host " \
	" AND q.username = g.username AND g.had <= g.c), " \
	"kept AS (UPDATE offline_queue q SET count = q.count - g.c, bytes = q.bytes - g.b FROM g " \
	" WHERE q.host = g.host AND q.username = g.username AND g.had > g.c) " \
	"SELECT coalesce(sum(c), 0)::int8 FROM g"

#define ITEM_COLUMNS \
	"SELECT id, ts, expire, sender, stanza, meta, lease_owner, lease_until FROM offline_message "
#define NOT_SET_ASIDE "meta IS DISTINCT FROM '" OS_SET_ASIDE "'::bytea"
/* $1 a prefix of the owner */
#define OWNER_PREFIX "lease_owner IS NOT NULL AND substring(lease_owner FROM 1 FOR octet_length($1::bytea)) = $1::bytea"

/* $1 host, $2 username throughout; every parameter and result is binary. */
static const struct {
	const char *sql;
	int nparams;
} statements[ST__COUNT] = {
	[ST_QUEUE_GET] = {"SELECT count, bytes FROM offline_queue "
	                  "WHERE host = $1::bytea AND username = $2::bytea", 2},
	/* also the transaction's id, to learn its fate should COMMIT's answer be lost */
	[ST_QUEUE_LOCK] = {"SELECT count, txid_current() FROM offline_queue "
	                   "WHERE host = $1::bytea AND username = $2::bytea FOR UPDATE", 2},
	/* $3 ts, $4 expire, $5 sender, $6 stanza, $7 meta, $8 max count, $9 max bytes,
	 * $10 dedup key; one row: count and id when stored, else NULLs and whether
	 * the key was found (see 5. above) */
	[ST_STORE] = {
		"WITH dup AS (SELECT EXISTS (SELECT 1 FROM offline_message WHERE host = $1::bytea"
		" AND username = $2::bytea AND dedup = $10::bytea) AS found), "
		"counter AS ("
		" INSERT INTO offline_queue AS c (host, username, count, bytes)"
		" SELECT $1::bytea, $2::bytea, 1, octet_length($6::bytea) FROM dup"
		" WHERE NOT dup.found AND ($8::int8 IS NULL OR 1 <= $8::int8)"
		"  AND ($9::int8 IS NULL OR octet_length($6::bytea) <= $9::int8)"
		" ON CONFLICT (host, username) DO UPDATE"
		" SET count = c.count + 1, bytes = c.bytes + excluded.bytes"
		" WHERE ($8::int8 IS NULL OR c.count + 1 <= $8::int8)"
		"  AND ($9::int8 IS NULL OR c.bytes + excluded.bytes <= $9::int8)"
		" RETURNING c.count), "
		"msg AS ("
		" INSERT INTO offline_message (host, username, ts, expire, sender, stanza, meta, dedup)"
		" SELECT $1::bytea, $2::bytea, $3::int8, $4::int8, $5::bytea, $6::bytea, $7::bytea,"
		" $10::bytea FROM counter RETURNING id) "
		"SELECT counter.count, msg.id, dup.found FROM dup LEFT JOIN counter ON true"
		" LEFT JOIN msg ON true", 10},
	/* $3: how many rows at most (NULL: all); see SCAN_SLACK */
	[ST_SCAN] = {ITEM_COLUMNS "WHERE host = $1::bytea AND username = $2::bytea ORDER BY id LIMIT $3::int8", 3},
	/* $3 the last id read */
	[ST_DEL_UPTO] = {USER_DELETE("id <= $3::int8"), 3},
	/* $3 an int8[] of ids */
	[ST_DEL_IDS] = {USER_DELETE("id = ANY($3::int8[])"), 3},
	/* $3 after id, $4 max (NULL: all) */
	[ST_LIST] = {ITEM_COLUMNS "WHERE host = $1::bytea AND username = $2::bytea AND id > $3::int8 "
	             "ORDER BY id LIMIT $4::int8", 4},
	[ST_HOST_DEL] = {BULK_DELETE("host = $1::bytea", "true"), 1},
	[ST_EXPIRED_DEL] = {BULK_DELETE("(host, username) IN (SELECT host, username FROM offline_message "
	                                "WHERE expire <= $1::int8)", "m.expire <= $1::int8"), 1},
	[ST_OLDER_DEL] = {BULK_DELETE("(host, username) IN (SELECT host, username FROM offline_message "
	                              "WHERE ts < $1::int8)", "m.ts < $1::int8"), 1},
	[ST_USERS] = {"SELECT username, count, bytes FROM offline_queue "
	              "WHERE host = $1::bytea AND count > 0 ORDER BY username", 1},
	/* pop's: $3 the last id read; rows set aside stay (see OS_SET_ASIDE) */
	[ST_POP_DEL] = {USER_DELETE("id <= $3::int8 AND " NOT_SET_ASIDE), 3},
	/* lease's: $3 an int8[] of the ids it took, $4 owner, $5 until */
	[ST_LEASE_SET] = {"UPDATE offline_message SET lease_owner = $4::bytea, lease_until = $5::int8 "
	                  "WHERE host = $1::bytea AND username = $2::bytea AND id = ANY($3::int8[])", 5},
	/* lease's: the expired rows up to $3, the last id read, at $4 */
	[ST_LEASE_DEL] = {USER_DELETE("id <= $3::int8 AND expire <= $4::int8 AND " NOT_SET_ASIDE), 4},
	/* $3 now, $4 the owner whose leases do not count (NULL: none) */
	[ST_HELD] = {"SELECT max(lease_until) FROM offline_message WHERE host = $1::bytea "
	             "AND username = $2::bytea AND lease_owner IS NOT NULL AND lease_until > $3::int8 "
	             "AND ($4::bytea IS NULL OR lease_owner <> $4::bytea) "
	             "AND (expire IS NULL OR expire > $3::int8)", 4},
	[ST_RELEASE] = {"UPDATE offline_message SET lease_owner = NULL, lease_until = NULL "
	                "WHERE host = $1::bytea AND username = $2::bytea AND lease_owner = $3::bytea", 3},
	[ST_RELEASE_ALL] = {"UPDATE offline_message SET lease_owner = NULL, lease_until = NULL "
	                    "WHERE " OWNER_PREFIX, 1},
	[ST_RENEW] = {"UPDATE offline_message SET lease_until = $2::int8 WHERE " OWNER_PREFIX, 2},
};

/* Table names carry a prefix: the database is usually shared with
 * Prosody's own SQL storage and others. The sequence must keep cache 1
 * (see 3. above). */
static const char schema_v1[] =
	"CREATE TABLE offline_meta (name text PRIMARY KEY, value bigint NOT NULL);"
	"CREATE TABLE offline_queue ("
	" host bytea NOT NULL, username bytea NOT NULL,"
	" count bigint NOT NULL, bytes bigint NOT NULL,"
	" PRIMARY KEY (host, username));"
	"CREATE TABLE offline_message ("
	" id bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,"
	" host bytea NOT NULL, username bytea NOT NULL,"
	" ts bigint NOT NULL, expire bigint,"
	" sender bytea NOT NULL, stanza bytea NOT NULL, meta bytea);"
	"CREATE INDEX offline_message_user ON offline_message (host, username, id);"
	"CREATE INDEX offline_message_expire ON offline_message (expire) WHERE expire IS NOT NULL;"
	"CREATE INDEX offline_message_ts ON offline_message (ts);";

/* Version 2 adds leases (owner and until: NULL when free) and the dedup key,
 * unique per user (see 5. above). Adding columns without a default rewrites no
 * row; both indexes are partial, so a row without a key or a lease has no entry. */
static const char schema_v2[] =
	"ALTER TABLE offline_message ADD COLUMN lease_owner bytea, ADD COLUMN lease_until bigint,"
	" ADD COLUMN dedup bytea;"
	"CREATE UNIQUE INDEX offline_message_dedup ON offline_message (host, username, dedup)"
	" WHERE dedup IS NOT NULL;"
	"CREATE INDEX offline_message_lease ON offline_message (lease_owner)"
	" WHERE lease_owner IS NOT NULL;";

/* migrations[v] takes a database from schema version v to v + 1. */
static const char *const migrations[SCHEMA_VERSION] = {
	[0] = schema_v1,
	[1] = schema_v2,
};

typedef struct {
	PGconn *conn;
	PGresult *live;  /* a result being emitted; freed by the next call if an emit raised */
	int prepared;    /* the statements exist on this session */
	int pid;         /* the server process of the connection (its last good one) */
	int backoff_ms;  /* 0, or the wait before the next reconnection attempt */
	struct timespec retry_at;
	char down[160];  /* why the last reconnection failed */
} pg;

typedef struct {
	int n, too_big;
	const char *val[MAX_PARAMS];
	int len[MAX_PARAMS], fmt[MAX_PARAMS];
	char num[MAX_PARAMS][8];
} params;

static void put_be64(char *b, int64_t v) {
	uint64_t u = (uint64_t)v;
	int i;
	for (i = 7; i >= 0; i--, u >>= 8)
		b[i] = (char)(u & 0xff);
}

static int64_t get_be64(const char *b) {
	uint64_t u = 0;
	int i;
	for (i = 0; i < 8; i++)
		u = (u << 8) | (unsigned char)b[i];
	return u <= INT64_MAX ? (int64_t)u : -(int64_t)(~u) - 1;
}

static void p_bytes(params *p, const char *b, size_t n) {
	if (n > INT_MAX)
		p->too_big = 1, n = 0;
	p->val[p->n] = b ? b : "";
	p->len[p->n] = (int)n;
	p->fmt[p->n++] = 1;
}

static void p_i64(params *p, int64_t v) {
	put_be64(p->num[p->n], v);
	p_bytes(p, p->num[p->n], 8);
}

static void p_null(params *p) {
	p->val[p->n] = NULL;
	p->len[p->n] = 0;
	p->fmt[p->n++] = 1;
}

static void p_key(params *p, const os_key *k) {
	p->n = p->too_big = 0;
	p_bytes(p, k->host.p, k->host.n);
	p_bytes(p, k->user.p, k->user.n);
}

/* Copies libpq's text with every run of whitespace as one space. */
static void tidy(char *dst, size_t size, const char *src) {
	size_t n = 0;
	int space = 0;
	for (; src && *src && n + 1 < size; src++) {
		if (*src == ' ' || *src == '\n' || *src == '\t' || *src == '\r') {
			space = n > 0;
			continue;
		}
		if (space && n + 2 < size)
			dst[n++] = ' ';
		space = 0;
		dst[n++] = *src;
	}
	dst[n] = '\0';
}

/* SQLSTATE as a base-36 number: what Lua's tonumber(state, 36) gives. */
static int sqlstate_code(const char *state) {
	int code = 0, i;
	for (i = 0; state && i < 5 && state[i]; i++) {
		char c = state[i];
		code = code * 36 + (c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'Z' ? c - 'A' + 10 : 0);
	}
	return code;
}

/* Records why `r` (or the connection) failed; call before any rollback. */
static int pgfail(os_store *s, pg *g, const PGresult *r) {
	char msg[200];
	const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
	const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
	tidy(msg, sizeof msg, primary ? primary : PQerrorMessage(g->conn));
	if (PQstatus(g->conn) != CONNECTION_OK)
		return os_fail(s, 0, "lost the connection to PostgreSQL (reconnecting on the next call): %s%s%s%s",
		               msg, state ? " (SQLSTATE " : "", state ? state : "", state ? ")" : "");
	if (state)
		return os_fail(s, sqlstate_code(state), "%s (SQLSTATE %s)", msg, state);
	return os_fail(s, 0, "%s", msg[0] ? msg : "PostgreSQL call failed");
}

static int result_ok(const PGresult *r) {
	ExecStatusType st = PQresultStatus(r); /* NULL gives PGRES_FATAL_ERROR */
	return st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK;
}

static PGresult *run(pg *g, int which, const params *p) {
	char name[32];
	snprintf(name, sizeof name, "offline_store_%d", which);
	return PQexecPrepared(g->conn, name, p->n, p->val, p->len, p->fmt, 1);
}

static int64_t col_i64(const PGresult *r, int row, int col) {
	if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 8)
		return 0;
	return get_be64(PQgetvalue(r, row, col));
}

static os_str col_str(const PGresult *r, int row, int col) {
	os_str v;
	v.p = PQgetvalue(r, row, col);
	v.n = (size_t)PQgetlength(r, row, col);
	return v;
}

static void read_item(const PGresult *r, int row, os_item *it) {
	it->id = col_i64(r, row, 0);
	it->ts = col_i64(r, row, 1);
	it->expire = PQgetisnull(r, row, 2) ? OS_NONE : col_i64(r, row, 2);
	it->from = col_str(r, row, 3);
	it->xml = col_str(r, row, 4);
	if (PQgetisnull(r, row, 5))
		it->meta.p = NULL, it->meta.n = 0;
	else
		it->meta = col_str(r, row, 5);
	it->dedup.p = NULL, it->dedup.n = 0;
	if (PQgetisnull(r, row, 6)) {
		it->lease_owner.p = NULL, it->lease_owner.n = 0;
		it->lease_until = 0;
	} else {
		it->lease_owner = col_str(r, row, 6);
		it->lease_until = col_i64(r, row, 7);
	}
}

/* Runs a plain command (BEGIN, COMMIT, ROLLBACK); 1 when it succeeded. */
static int command(pg *g, const char *sql) {
	PGresult *r = PQexec(g->conn, sql);
	int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
	PQclear(r);
	return ok;
}

static int begin(os_store *s, pg *g) {
	PGresult *r = PQexec(g->conn, "BEGIN");
	int rc = result_ok(r) ? OS_OK : pgfail(s, g, r);
	PQclear(r);
	return rc;
}

/* Records the failure of `r`, then rolls back whatever is open. */
static int abort_tx(os_store *s, pg *g, const PGresult *r) {
	pgfail(s, g, r);
	if (PQstatus(g->conn) == CONNECTION_OK && PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		command(g, "ROLLBACK");
	return OS_FAIL;
}

static int commit(os_store *s, pg *g) {
	PGresult *r = PQexec(g->conn, "COMMIT");
	int rc = result_ok(r) ? OS_OK : abort_tx(s, g, r);
	PQclear(r);
	return rc;
}

static int prepare_all(os_store *s, pg *g) {
	int i;
	for (i = 0; i < ST__COUNT; i++) {
		char name[32];
		PGresult *r;
		int ok;
		snprintf(name, sizeof name, "offline_store_%d", i);
		r = PQprepare(g->conn, name, statements[i].sql, statements[i].nparams, NULL);
		ok = result_ok(r);
		if (!ok) {
			pgfail(s, g, r);
			PQclear(r);
			return OS_FAIL;
		}
		PQclear(r);
	}
	g->prepared = 1;
	return OS_OK;
}

static void quiet(void *arg, const char *message) {
	(void)arg;
	(void)message;
}

static int64_t ms_until(const struct timespec *t) {
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int64_t)(t->tv_sec - now.tv_sec) * 1000 + (t->tv_nsec - now.tv_nsec) / 1000000;
}

/* True when the idle connection has input waiting: the server said goodbye
 * (a restart sends FATAL, then closes). Reading it marks the connection bad. */
static void notice_hangup(pg *g) {
	int tries;
	for (tries = 0; tries < 4 && PQstatus(g->conn) == CONNECTION_OK; tries++) {
		struct pollfd fd;
		fd.fd = PQsocket(g->conn);
		fd.events = POLLIN;
		fd.revents = 0;
		if (fd.fd < 0 || poll(&fd, 1, 0) <= 0)
			return;
		if (!PQconsumeInput(g->conn))
			return;
	}
}

/* Reconnects a lost connection, at most once per backoff interval (so a
 * dead server does not stall every call); blocks for up to connect_timeout. */
static int reconnect(os_store *s, pg *g) {
	g->prepared = 0;
	if (g->backoff_ms > 0 && ms_until(&g->retry_at) > 0)
		return os_fail(s, 0, "PostgreSQL is unreachable (next reconnection attempt in %lld ms): %s",
		               (long long)ms_until(&g->retry_at), g->down);
	PQreset(g->conn);
	if (PQstatus(g->conn) != CONNECTION_OK) {
		tidy(g->down, sizeof g->down, PQerrorMessage(g->conn));
		g->backoff_ms = g->backoff_ms ? g->backoff_ms * 2 : BACKOFF_MIN_MS;
		if (g->backoff_ms > BACKOFF_MAX_MS)
			g->backoff_ms = BACKOFF_MAX_MS;
		clock_gettime(CLOCK_MONOTONIC, &g->retry_at);
		g->retry_at.tv_sec += g->backoff_ms / 1000;
		g->retry_at.tv_nsec += (long)(g->backoff_ms % 1000) * 1000000L;
		if (g->retry_at.tv_nsec >= 1000000000L)
			g->retry_at.tv_sec++, g->retry_at.tv_nsec -= 1000000000L;
		return os_fail(s, 0, "PostgreSQL is unreachable (reconnecting failed): %s", g->down);
	}
	g->backoff_ms = 0;
	g->pid = PQbackendPID(g->conn);
	return OS_OK;
}

/* Every call starts here: frees a result an abandoned call left behind,
 * reconnects a lost connection (with backoff), re-prepares the statements
 * and rolls back a transaction an abandoned call left open. */
static int ready(os_store *s, pg *g) {
	if (g->live) {
		PQclear(g->live);
		g->live = NULL;
	}
	notice_hangup(g);
	if (PQstatus(g->conn) != CONNECTION_OK && reconnect(s, g) != OS_OK)
		return OS_FAIL;
	if (!g->prepared && prepare_all(s, g) != OS_OK)
		return OS_FAIL;
	if (PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		command(g, "ROLLBACK");
	return OS_OK;
}

/* What became of transaction `xid`, asked on a new connection: 'c'ommitted,
 * 'a'borted, 'i'n progress, or 0 when the server could not say. */
static char xact_status(pg *g, int64_t xid) {
	char num[24];
	const char *val[1];
	PGresult *r;
	char st = 0;
	snprintf(num, sizeof num, "%lld", (long long)xid);
	val[0] = num;
	r = PQexecParams(g->conn, "SELECT txid_status($1::int8)", 1, NULL, val, NULL, NULL, 0);
	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
		st = PQgetvalue(r, 0, 0)[0];
	PQclear(r);
	return st;
}

static void sleep_ms(long ms) {
	struct timespec t;
	t.tv_sec = ms / 1000;
	t.tv_nsec = (ms % 1000) * 1000000L;
	nanosleep(&t, NULL);
}

/* Called when the connection was lost with COMMIT of transaction `xid` sent
 * and its answer missing: the transaction may or may not have committed.
 * Reconnects and asks the server. A transaction still running is the old
 * server process that has not noticed the lost client yet (or whose COMMIT
 * never arrived): it is terminated (our own role may), which settles it,
 * and waited for, up to IN_DOUBT_WAIT_MS. Returns OS_OK when it committed,
 * OS_FAIL when it did not, and `unknown` when the server cannot tell (it is
 * unreachable, or the wait ran out). The failure message stays that of the
 * lost COMMIT, with the outcome added. */
static int resolve(os_store *s, pg *g, int64_t xid, int unknown) {
	int old_pid = g->pid, waited = 0, terminated = 0;
	char lost[sizeof s->errmsg];
	memcpy(lost, s->errmsg, sizeof lost);
	if (xid <= 0)
		return unknown;
	g->backoff_ms = 0; /* one attempt now, whatever the backoff said */
	if (reconnect(s, g) != OS_OK) {
		os_fail(s, 0, "%s; whether it committed is unknown", lost);
		return unknown;
	}
	for (;;) {
		char st = xact_status(g, xid);
		if (st == 'c')
			return OS_OK;
		if (st == 'a') {
			os_fail(s, 0, "%s; the transaction was rolled back", lost);
			return OS_FAIL;
		}
		if (st != 'i' || waited >= IN_DOUBT_WAIT_MS)
			break;
		if (!terminated && waited >= 5 * IN_DOUBT_POLL_MS && old_pid > 0) {
			char sql[64];
			snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)", old_pid);
			PQclear(PQexec(g->conn, sql));
			terminated = 1;
		}
		sleep_ms(IN_DOUBT_POLL_MS);
		waited += IN_DOUBT_POLL_MS;
	}
	os_fail(s, 0, "%s; whether it committed is unknown", lost);
	return unknown;
}

/* Commits the transaction `xid` (from ST_QUEUE_LOCK); if its answer is lost
 * with the connection, resolve()s what happened (`unknown` as there). */
static int commit_xid(os_store *s, pg *g, int64_t xid, int unknown) {
	int rc = commit(s, g);
	if (rc != OS_OK && PQstatus(g->conn) != CONNECTION_OK)
		rc = resolve(s, g, xid, unknown);
	return rc;
}

static int pg_store(os_store *s, const os_key *k, const os_item *m, const os_limit *lim,
                    int64_t *count, int64_t *id) {
	pg *g = s->impl;
	PGresult *r = NULL;
	params p;
	int rc;
	if (ready(s, g) != OS_OK)
		return OS_FAIL;
	p_key(&p, k);
	p_i64(&p, m->ts);
	if (m->expire == OS_NONE)
		p_null(&p);
	else
		p_i64(&p, m->expire);
	p_bytes(&p, m->from.p, m->from.n);
	p_bytes(&p, m->xml.p, m->xml.n);
	if (m->meta.p)
		p_bytes(&p, m->meta.p, m->meta.n);
	else
		p_null(&p);
	if (lim->max_count == OS_NONE)
		p_null(&p);
	else
		p_i64(&p, lim->max_count);
	if (lim->max_bytes == OS_NONE)
		p_null(&p);
	else
		p_i64(&p, lim->max_bytes);
	if (m->dedup.p)
		p_bytes(&p, m->dedup.p, m->dedup.n);
	else
		p_null(&p);
	if (p.too_big)
		return os_fail(s, 0, "a string is too large to store");
	r = run(g, ST_STORE, &p);
	if (!result_ok(r)) {
		const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE),
		           *constraint = PQresultErrorField(r, PG_DIAG_CONSTRAINT_NAME);
		if (!(state && strcmp(state, "23505") == 0 && constraint &&
		      strcmp(constraint, "offline_message_dedup") == 0)) {
			rc = pgfail(s, g, r);
			goto done;
		}
		rc = OS_DUP; /* another writer stored the key first (see 5. above) */
	} else if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 1)) {
		*count = col_i64(r, 0, 0);
		*id = col_i64(r, 0, 1);
		rc = OS_OK;
		goto done;
	} else {
		rc = PQntuples(r) == 1 && PQgetvalue(r, 0, 2)[0] ? OS_DUP : OS_LIMIT;
	}
	/* Refused: nothing was written; report the count as it is now. */
	PQclear(r);
	p.n = 2;
	r = run(g, ST_QUEUE_GET, &p);
	if (!result_ok(r)) {
		rc = pgfail(s, g, r);
		goto done;
	}
	*count = PQntuples(r) == 1 ? col_i64(r, 0, 0) : 0;
done:
	PQclear(r);
	return rc;
}

/* An int8[] in binary, for `= ANY($n::int8[])`: ndim, has-nulls, element type
 * (int8 = 20), length, lower bound, then (length, value) per element. NULL when
 * out of memory; *size its bytes. */
static char *id_array(const int64_t *ids, size_t n, size_t *size) {
	size_t i;
	char *a;
	*size = 20 + 12 * n;
	if (!(a = malloc(*size)))
		return NULL;
	memset(a, 0, 20);
	a[3] = 1;
	a[11] = 20;
	put_be64(a + 12, (int64_t)n << 32 | 1); /* length, lower bound 1 */
	for (i = 0; i < n; i++) {
		char *e = a + 20 + 12 * i;
		memset(e, 0, 4);
		e[3] = 8;
		put_be64(e + 4, ids[i]);
	}
	return a;
}

enum { SKIP, EXPIRED, TAKE, STOP };

/* What pop (owner.p NULL) or lease does with a row it reads. */
static int classify(const os_item *it, os_str owner, int64_t now) {
	if (os_is_set_aside(it->meta))
		return SKIP;
	if (it->expire != OS_NONE && it->expire <= now)
		return EXPIRED;
	if (it->lease_owner.p && it->lease_until > now)
		return owner.p && it->lease_owner.n == owner.n &&
		       memcmp(it->lease_owner.p, owner.p, owner.n) == 0 ? SKIP /* in flight to owner */ : STOP;
	return TAKE;
}

/* pop (owner.p NULL: deletes what it takes) and lease (marks it for owner
 * until `until`), as backend.h says, under the user's lock (see 3. and 6.). */
/* Rows a page may pass over beyond its max before it ends short (it then
 * returns fewer than max; the next call goes on from there). */
#define SCAN_SLACK 1024

static int take(os_store *s, const os_key *k, os_str owner, int64_t now, int64_t until,
                int64_t max, os_emit_item emit, void *ud, int64_t *expired, int64_t *held) {
	pg *g = s->impl;
	PGresult *r = NULL;
	params p;
	int64_t returned = 0, last = 0, xid, *ids = NULL;
	int rc = OS_OK, i, n, stopped = 0;
	*expired = 0;
	*held = OS_NONE;
	if (ready(s, g) != OS_OK)
		return OS_FAIL;
	p_key(&p, k);
	/* Cheap read first, outside any transaction: the broadcast fires on every login. */
	r = run(g, ST_QUEUE_GET, &p);
	if (!result_ok(r)) {
		rc = pgfail(s, g, r);
		goto done;
	}
	if (PQntuples(r) == 0 || col_i64(r, 0, 0) == 0)
		goto done;
	PQclear(r);
	r = NULL;
	if (begin(s, g) != OS_OK) {
		rc = OS_FAIL;
		goto done;
	}
	r = run(g, ST_QUEUE_LOCK, &p);
	if (!result_ok(r))
		goto fail;
	if (PQntuples(r) == 0) { /* emptied meanwhile by another node */
		rc = commit(s, g);
		goto done;
	}
	xid = col_i64(r, 0, 1);
	PQclear(r);
	/* A new statement, so a snapshot taken after the lock (see 3. above). A page
	 * reads its rows and SCAN_SLACK more for the ones it passes over (expired,
	 * set aside, its own in flight), not the whole queue: a backlog of N drained
	 * in pages would otherwise fetch about N * N / page rows. */
	p.n = 2;
	if (max == OS_NONE || max > INT64_MAX - SCAN_SLACK)
		p_null(&p);
	else
		p_i64(&p, max + SCAN_SLACK);
	r = run(g, ST_SCAN, &p);
	if (!result_ok(r))
		goto fail;
	n = PQntuples(r);
	g->live = r;
	for (i = 0; i < n && (max == OS_NONE || returned < max); i++) {
		os_item it;
		int what;
		read_item(r, i, &it);
		if ((what = classify(&it, owner, now)) == STOP) {
			stopped = 1;
			break;
		}
		if (what == SKIP)
			continue;
		last = it.id;
		if (what == EXPIRED) {
			(*expired)++;
			continue;
		}
		it.lease_owner.p = NULL, it.lease_owner.n = 0, it.lease_until = 0;
		returned++;
		emit(ud, &it);
	}
	g->live = NULL;
	/* (the ids lease took, read again: emit may raise, and nothing must leak) */
	if (owner.p && returned > 0) {
		int j, taken = 0;
		if (!(ids = malloc((size_t)returned * sizeof *ids))) {
			os_fail(s, 0, "out of memory");
			command(g, "ROLLBACK");
			rc = OS_FAIL;
			goto done;
		}
		for (j = 0; j < i; j++) {
			os_item it;
			read_item(r, j, &it);
			if (classify(&it, owner, now) == TAKE)
				ids[taken++] = it.id;
		}
	}
	PQclear(r);
	r = NULL;
	if (stopped && returned == 0) {
		p.n = 2;
		p_i64(&p, now);
		if (owner.p)
			p_bytes(&p, owner.p, owner.n);
		else
			p_null(&p);
		r = run(g, ST_HELD, &p);
		if (!result_ok(r))
			goto fail;
		if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
			*held = col_i64(r, 0, 0);
		PQclear(r);
		r = NULL;
	}
	if (last > 0 && (!owner.p || *expired > 0)) {
		p.n = 2;
		p_i64(&p, last);
		p_i64(&p, now);
		p.n = owner.p ? 4 : 3;
		r = run(g, owner.p ? ST_LEASE_DEL : ST_POP_DEL, &p);
		if (!result_ok(r))
			goto fail;
		PQclear(r);
		r = NULL;
	}
	if (owner.p && returned > 0) {
		size_t size;
		char *a = id_array(ids, (size_t)returned, &size);
		if (!a) {
			os_fail(s, 0, "out of memory");
			command(g, "ROLLBACK");
			rc = OS_FAIL;
			goto done;
		}
		p.n = 2;
		p_bytes(&p, a, size);
		p_bytes(&p, owner.p, owner.n);
		p_i64(&p, until);
		r = run(g, ST_LEASE_SET, &p);
		free(a);
		if (!result_ok(r))
			goto fail;
	}
	/* In doubt and the server cannot tell: the messages go out, since a
	 * message delivered twice is better than one lost. */
	rc = commit_xid(s, g, xid, OS_OK);
	goto done;
fail:
	rc = abort_tx(s, g, r);
done:
	free(ids);
	PQclear(r);
	return rc;
}

/* Runs one of the lease updates (its own transaction); *touched is how many rows it changed. */
static int relet(os_store *s, int which, params *p, int64_t *touched) {
	pg *g = s->impl;
	PGresult *r;
	int rc = OS_OK;
	*touched = 0;
	if (ready(s, g) != OS_OK)
		return OS_FAIL;
	if (p->too_big)
		return os_fail(s, 0, "a string is too large");
	r = run(g, which, p);
	if (!result_ok(r))
		rc = pgfail(s, g, r);
	else
		*touched = strtoll(PQcmdTuples(r), NULL, 10);
	PQclear(r);
	return rc;
}

static int pg_release(os_store *s, const os_key *k, os_str owner, int64_t *touched) {
	params p;
	p_key(&p, k);
	p_bytes(&p, owner.p, owner.n);
	return relet(s, ST_RELEASE, &p, touched);
}

/* Two processes started with the same node name (a misconfiguration) must not
 * release each other's live leases. The first to release a prefix's leases
 * takes a session-level advisory lock named by the prefix and holds it as long
 * as its connection lives; a second process finds it taken, releases nothing
 * and fails with SQLSTATE 55P03 (lock_not_available). A reconnection drops the
 * lock (taken again at the next release_all). Named (class "OFLS", hash of the
 * schema and the prefix: advisory locks are per database): two names whose
 * hashes collide share it (a false alarm, never a wrong release). */
static int hold_prefix(os_store *s, pg *g, os_str prefix) {
	const char *val[1];
	int len[1], fmt[1] = { 1 }, rc;
	PGresult *r;
	if (ready(s, g) != OS_OK)
		return OS_FAIL;
	val[0] = prefix.p, len[0] = (int)prefix.n;
	r = PQexecParams(g->conn, "SELECT pg_try_advisory_lock(1330007123, hashtext(current_schema() || md5($1::bytea)))",
	                 1, NULL, val, len, fmt, 1);
	if (!result_ok(r) || PQntuples(r) != 1 || PQgetlength(r, 0, 0) != 1)
		rc = pgfail(s, g, r);
	else if (PQgetvalue(r, 0, 0)[0])
		rc = OS_OK;
	else
		rc = os_fail(s, sqlstate_code("55P03"), "the leases of \"%.*s\" are held by another live process: "
		             "none released (SQLSTATE 55P03)", (int)(prefix.n > 80 ? 80 : prefix.n), prefix.p);
	PQclear(r);
	return rc;
}

static int pg_release_all(os_store *s, const os_str *prefix, int64_t *touched) {
	params p;
	*touched = 0;
	if (prefix && prefix->n > 0 && hold_prefix(s, s->impl, *prefix) != OS_OK)
		return OS_FAIL;
	p.n = p.too_big = 0;
	p_bytes(&p, prefix ? prefix->p : "", prefix ? prefix->n : 0);
	return relet(s, ST_RELEASE_ALL, &p, touched);
}

static int pg_renew(os_store *s, os_str prefix, int64_t until, int64_t *touched) {
	params p;
	p.n = p.too_big = 0;
	p_bytes(&p, prefix.p, prefix.n);
	p_i64(&p, until);
	return relet(s, ST_RENEW, &p, touched);
}

static int pg_count(os_store *s, const os_key *k, int64_t *count, int64_t *bytes) {
	pg *g = s->impl;
	PGresult *r;
	params p;
	int rc = OS_OK;
	if (ready(s, g) != OS_OK)
		return OS_FAIL;
	p_key(&p, k);
	r = run(g, ST_QUEUE_GET, &p);
	*count = *bytes = 0;
	if (!result_ok(r))
		rc = pgfail(s, g, r);
	else if (PQntuples(r) == 1) {
		*count = col_i64(r, 0, 0);
		*bytes = col_i64(r, 0, 1);
	}
	PQclear(r);
	return rc;
}

static int pg_list(os_store *s, const os_key *k, int64_t after_id, int64_t max,
                   os_emit_item emit, void *ud) {
	pg *g = s->impl;
	PGresult *r;
	params p;
	int i, n, rc = OS_OK;
	if (ready(s, g) != OS_OK)
		return OS_FAIL;
	p_key(&p, k);
	p_i64(&p, after_id);
	if (max == OS_NONE)
		p_null(&p);
	else
		p_i64(&p, max);
	r = run(g, ST_LIST, &p);
	if (!result_ok(r)) {
		rc = pgfail(s, g, r);
		goto done;
	}
	n = PQntuples(r);
	g->live = r;
	for (i = 0; i < n; i++) {
		os_item it;
		read_item(r, i, &it);
		emit(ud, &it);
	}
	g->live = NULL;
done:
	PQclear(r);
	return rc;
}

/* Locks the user's queue row and runs one of the USER_DELETE statements
 * with `arg` as $3; *touched is how many messages it deleted. */
static int locked_delete(os_store *s, const os_key *k, int which, const char *arg, int arg_n,
                         int64_t *touched) {
	pg *g = s->impl;
	PGresult *r = NULL;
	params p;
	int64_t xid;
	int rc;
	*touched = 0;
	if (ready(s, g) != OS_OK)
		return OS_FAIL;
	if (begin(s, g) != OS_OK)
		return OS_FAIL;
	p_key(&p, k);
	r = run(g, ST_QUEUE_LOCK, &p);
	if (!result_ok(r))
		goto fail;
	if (PQntuples(r) == 0) { /* no queue, no messages */
		rc = commit(s, g);
		goto done;
	}
	xid = col_i64(r, 0, 1);
	PQclear(r);
	p_bytes(&p, arg, (size_t)arg_n);
	r = run(g, which, &p);
	if (!result_ok(r))
		goto fail;
	*touched = col_i64(r, 0, 0);
	rc = commit_xid(s, g, xid, OS_FAIL);
	if (rc != OS_OK)
		*touched = 0;
	goto done;
fail:
	rc = abort_tx(s, g, r);
done:
	PQclear(r);
	return rc;
}

static int pg_remove(os_store *s, const os_key *k, const int64_t *ids, size_t n,
                     int64_t *touched) {
	size_t size;
	char *a;
	int rc;
	*touched = 0;
	if (n == 0)
		return OS_OK;
	if (n > (INT_MAX - 20) / 12)
		return os_fail(s, 0, "too many ids");
	if (!(a = id_array(ids, n, &size)))
		return os_fail(s, 0, "out of memory");
	rc = locked_delete(s, k, ST_DEL_IDS, a, (int)size, touched);
	free(a);
	return rc;
}

static int pg_remove_user(os_store *s, const os_key *k, int64_t *touched) {
	char all[8];
	put_be64(all, INT64_MAX);
	return locked_delete(s, k, ST_DEL_UPTO, all, 8, touched);
}

/* One BULK_DELETE statement, its own transaction. */
static int bulk(os_store *s, int which, params *p, int64_t *touched) {
	pg *g = s->impl;
	PGresult *r;
	int rc = OS_OK;
	*touched = 0;
	if (ready(s, g) != OS_OK)
		return OS_FAIL;
	r = run(g, which, p);
	if (!result_ok(r))
		rc = pgfail(s, g, r);
	else
		*touched = col_i64(r, 0, 0);
	PQclear(r);
	return rc;
}

static int pg_remove_host(os_store *s, os_str host, int64_t *touched) {
	params p;
	p.n = p.too_big = 0;
	p_bytes(&p, host.p, host.n);
	return bulk(s, ST_HOST_DEL, &p, touched);
}

static int pg_delete_expired(os_store *s, int64_t now, int64_t *touched) {
	params p;
	p.n = p.too_big = 0;
	p_i64(&p, now);
	return bulk(s, ST_EXPIRED_DEL, &p, touched);
}

static int pg_delete_older_than(os_store *s, int64_t cutoff, int64_t *touched) {
	params p;
	p.n = p.too_big = 0;
	p_i64(&p, cutoff);
	return bulk(s, ST_OLDER_DEL, &p, touched);
}

static int pg_users(os_store *s, os_str host, os_emit_user emit, void *ud) {
	pg *g = s->impl;
	PGresult *r;
	params p;
	int i, n, rc = OS_OK;
	if (ready(s, g) != OS_OK)
		return OS_FAIL;
	p.n = p.too_big = 0;
	p_bytes(&p, host.p, host.n);
	r = run(g, ST_USERS, &p);
	if (!result_ok(r)) {
		rc = pgfail(s, g, r);
		goto done;
	}
	n = PQntuples(r);
	g->live = r;
	for (i = 0; i < n; i++)
		emit(ud, col_str(r, i, 0), col_i64(r, i, 1), col_i64(r, i, 2));
	g->live = NULL;
done:
	PQclear(r);
	return rc;
}

static void pg_free(pg *g) {
	if (!g)
		return;
	PQclear(g->live);
	PQfinish(g->conn); /* the server rolls back anything left open */
	free(g);
}

static void pg_close(os_store *s) {
	pg_free(s->impl);
	s->impl = NULL;
}

static const os_backend postgres_backend = {
	"postgres", pg_store, take, pg_release, pg_release_all, pg_renew, pg_count, pg_list, pg_remove, pg_remove_user,
	pg_remove_host, pg_delete_expired, pg_delete_older_than, pg_users, pg_close,
	NULL, NULL, /* no group commit */
};

/* Runs one text-mode query of the schema check; NULL (and s records why) on failure. */
static PGresult *query(os_store *s, pg *g, const char *sql, ExecStatusType want) {
	PGresult *r = PQexec(g->conn, sql);
	if (PQresultStatus(r) == want)
		return r;
	pgfail(s, g, r);
	PQclear(r);
	return NULL;
}

/* Creates or migrates the schema to SCHEMA_VERSION under an advisory lock
 * (several nodes may start at once); refuses a newer one. */
static int check_schema(os_store *s, pg *g) {
	PGresult *r = NULL;
	long long version = 0;
	char sql[160];
	int rc = OS_FAIL;
	if (!command(g, "BEGIN")) {
		pgfail(s, g, NULL);
		return OS_FAIL;
	}
	snprintf(sql, sizeof sql, "SELECT pg_advisory_xact_lock(%d)", SCHEMA_LOCK);
	if (!(r = query(s, g, sql, PGRES_TUPLES_OK)))
		goto done;
	PQclear(r);
	if (!(r = query(s, g, "SELECT to_regclass('offline_meta') IS NOT NULL", PGRES_TUPLES_OK)))
		goto done;
	if (strcmp(PQgetvalue(r, 0, 0), "t") == 0) {
		PQclear(r);
		if (!(r = query(s, g, "SELECT value FROM offline_meta WHERE name = 'schema_version'",
		                PGRES_TUPLES_OK)))
			goto done;
		if (PQntuples(r) != 1) {
			os_fail(s, 0, "offline_meta has no schema_version row; refusing to touch the tables");
			goto done;
		}
		version = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	}
	PQclear(r);
	r = NULL;
	if (version > SCHEMA_VERSION) {
		os_fail(s, 0, "schema version %lld was written by a newer offline-store "
		        "(this build knows up to %d); refusing to touch it", version, SCHEMA_VERSION);
		goto done;
	}
	if (version < SCHEMA_VERSION) {
		while (version < SCHEMA_VERSION) {
			if (!(r = query(s, g, migrations[version], PGRES_COMMAND_OK))) {
				char why[sizeof s->errmsg];
				memcpy(why, s->errmsg, sizeof why);
				os_fail(s, s->errcode, "migrating the schema to version %lld: %s", version + 1, why);
				goto done;
			}
			PQclear(r);
			version++;
		}
		snprintf(sql, sizeof sql, "INSERT INTO offline_meta VALUES ('schema_version', %d) "
		         "ON CONFLICT (name) DO UPDATE SET value = excluded.value", SCHEMA_VERSION);
		if (!(r = query(s, g, sql, PGRES_COMMAND_OK)))
			goto done;
		PQclear(r);
	}
	r = NULL;
	if (!command(g, "COMMIT")) {
		pgfail(s, g, NULL);
		goto done;
	}
	rc = OS_OK;
done:
	PQclear(r);
	if (rc != OS_OK && PQstatus(g->conn) == CONNECTION_OK &&
	    PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		command(g, "ROLLBACK");
	return rc;
}

int os_postgres_open(os_store *s, const char *conninfo) {
	/* Keywords later in the list win, so the operator's conninfo (expanded
	 * from dbname) overrides these defaults. */
	static const char *const keys[] = {"connect_timeout", "fallback_application_name", "dbname", NULL};
	const char *values[4];
	pg *g = calloc(1, sizeof *g);
	char msg[200];
	if (!g)
		return os_fail(s, 0, "out of memory");
	values[0] = "2"; /* connecting blocks the caller (reconnections too) */
	values[1] = "prosody-offline-store";
	values[2] = conninfo;
	values[3] = NULL;
	g->conn = PQconnectdbParams(keys, values, 1);
	if (!g->conn) {
		free(g);
		return os_fail(s, 0, "out of memory");
	}
	if (PQstatus(g->conn) != CONNECTION_OK) {
		tidy(msg, sizeof msg, PQerrorMessage(g->conn));
		os_fail(s, 0, "cannot connect to PostgreSQL: %s", msg);
		goto fail;
	}
	PQsetNoticeProcessor(g->conn, quiet, NULL);
	g->pid = PQbackendPID(g->conn);
	if (check_schema(s, g) != OS_OK || prepare_all(s, g) != OS_OK)
		goto fail;
	s->impl = g;
	s->be = &postgres_backend;
	return OS_OK;
fail:
	pg_free(g);
	return OS_FAIL;
}
