/* The postgres backend's SQL: its statements, its schema and the migrations
 * between versions, open and free. */
#define _POSIX_C_SOURCE 200809L /* struct timespec in backend_postgres.h */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_postgres.h"

#define SCHEMA_VERSION 2
#define SCHEMA_LOCK 1330007123 /* pg_advisory_xact_lock key for schema set-up: "OFLS" */
#define STATEMENT_TIMEOUT "10s"
#define LOCK_TIMEOUT "5s"

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

/* The store statement (see 2. and 5. in backend_postgres.c); id_col, overriding
 * and id_val insert a given id instead of the sequence's. */
#define STORE(id_col, overriding, id_val) \
	"WITH dup AS (SELECT EXISTS (SELECT 1 FROM offline_message WHERE host = $1::bytea" \
	" AND username = $2::bytea AND dedup = $10::bytea) AS found), " \
	"counter AS (" \
	" INSERT INTO offline_queue AS c (host, username, count, bytes)" \
	" SELECT $1::bytea, $2::bytea, 1, octet_length($6::bytea) FROM dup" \
	" WHERE NOT dup.found AND ($8::int8 IS NULL OR 1 <= $8::int8)" \
	"  AND ($9::int8 IS NULL OR octet_length($6::bytea) <= $9::int8)" \
	" ON CONFLICT (host, username) DO UPDATE" \
	" SET count = c.count + 1, bytes = c.bytes + excluded.bytes" \
	" WHERE ($8::int8 IS NULL OR c.count + 1 <= $8::int8)" \
	"  AND ($9::int8 IS NULL OR c.bytes + excluded.bytes <= $9::int8)" \
	" RETURNING c.count), " \
	"msg AS (" \
	" INSERT INTO offline_message (" id_col "host, username, ts, expire, sender, stanza, meta, dedup)" \
	overriding " SELECT" id_val " $1::bytea, $2::bytea, $3::int8, $4::int8, $5::bytea, $6::bytea, $7::bytea," \
	" $10::bytea FROM counter RETURNING id) " \
	"SELECT counter.count, msg.id, dup.found, CASE WHEN msg.id IS NULL THEN" \
	" (SELECT q.count FROM offline_queue q WHERE q.host = $1::bytea AND q.username = $2::bytea) END" \
	" FROM dup LEFT JOIN counter ON true LEFT JOIN msg ON true"

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
	 * $10 dedup key; one row: count and id when stored, else NULLs, whether
	 * the key was found (see 5. in backend_postgres.c) and the queue's count
	 * (as this statement's snapshot has it: the statement changed nothing) */
	[ST_STORE] = {STORE("", "", ""), 10},
	/* the same with $11 the id (a batch stored again after a deadlock keeps its ids) */
	[ST_STORE_ID] = {STORE("id, ", " OVERRIDING SYSTEM VALUE", " $11::int8,"), 11},
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
	/* eviction's walk (see 7. in backend_postgres.c): $3 after id, $4 how many rows */
	[ST_OLDEST] = {"SELECT id, octet_length(stanza)::int8, lease_owner IS NOT NULL FROM offline_message "
	               "WHERE host = $1::bytea AND username = $2::bytea AND id > $3::int8 "
	               "ORDER BY id LIMIT $4::int8", 4},
};

/* Table names carry a prefix: the database is usually shared with
 * Prosody's own SQL storage and others. The sequence must keep cache 1
 * (see 3. in backend_postgres.c). */
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
 * unique per user (see 5. in backend_postgres.c). Adding columns without a default rewrites no
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
	return OS_OK;
}

void pg_free(pg *g) {
	if (!g)
		return;
	PQclear(g->live);
	PQfinish(g->conn); /* the server rolls back anything left open */
	free(g);
}

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
	if (!pg_command(g, "BEGIN")) {
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
	if (!pg_command(g, "COMMIT")) {
		pgfail(s, g, NULL);
		goto done;
	}
	rc = OS_OK;
done:
	PQclear(r);
	if (rc != OS_OK && PQstatus(g->conn) == CONNECTION_OK &&
	    PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		pg_command(g, "ROLLBACK");
	return rc;
}

/* The session's timeouts: a statement or a lock wait that runs this long
 * fails (and its transaction rolls back) instead of holding the caller. Only
 * where the operator set none (in offline_postgres's options, or with ALTER
 * ROLE/DATABASE ... SET): theirs win. */
static const char session_timeouts[] =
	"SELECT set_config('statement_timeout', '" STATEMENT_TIMEOUT "', false) "
	"WHERE current_setting('statement_timeout') = '0';"
	"SELECT set_config('lock_timeout', '" LOCK_TIMEOUT "', false) "
	"WHERE current_setting('lock_timeout') = '0'";

/* Sets up a session that has just connected: its timeouts, the schema (checked
 * once per store, on its first connection), the prepared statements. */
int pg_setup(os_store *s, pg *g) {
	PGresult *r = PQexec(g->conn, session_timeouts);
	if (!result_ok(r)) {
		pgfail(s, g, r);
		PQclear(r);
		return OS_FAIL;
	}
	PQclear(r);
	if (!g->schema_ok) {
		if (check_schema(s, g) != OS_OK)
			return OS_FAIL;
		g->schema_ok = 1;
	}
	if (prepare_all(s, g) != OS_OK)
		return OS_FAIL;
	g->ready = 1;
	return OS_OK;
}

/* Opens without waiting on the network beyond a short bound: the connection
 * is started (PQconnectStartParams) and driven by pg_first_connect; one the
 * server has not answered yet goes on at the following calls. Only a conninfo
 * that cannot be used, a refusal (connection refused, wrong password) or a
 * schema it must not touch fails the open. libpq resolves a host name here,
 * and that blocks (getaddrinfo): hence the advice to give an address. */
int os_postgres_open(os_store *s, const char *conninfo) {
	/* Keywords later in the list win, so the operator's conninfo (expanded
	 * from dbname) overrides these defaults. */
	static const char *const keys[] = {"connect_timeout", "fallback_application_name", "dbname", NULL};
	const char *values[4];
	pg *g = calloc(1, sizeof *g);
	char msg[200];
	if (!g)
		return os_fail(s, 0, "out of memory");
	values[0] = "2"; /* how long an attempt may take before it counts as failed */
	values[1] = "prosody-offline-store";
	values[2] = conninfo;
	values[3] = NULL;
	g->conn = PQconnectStartParams(keys, values, 1);
	if (!g->conn) {
		free(g);
		return os_fail(s, 0, "out of memory");
	}
	if (PQstatus(g->conn) == CONNECTION_BAD) {
		pg_tidy(msg, sizeof msg, PQerrorMessage(g->conn));
		os_fail(s, 0, "cannot connect to PostgreSQL: %s", msg);
		goto fail;
	}
	PQsetNoticeProcessor(g->conn, pg_quiet, NULL);
	if (pg_first_connect(s, g) != OS_OK)
		goto fail;
	s->impl = g;
	s->be = &postgres_backend;
	return OS_OK;
fail:
	pg_free(g);
	return OS_FAIL;
}
