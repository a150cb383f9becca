/* The postgres backend's internals, shared by its three files:
 * backend_postgres.c (the operations, and how they stay exact under
 * concurrency), backend_postgres_conn.c (the connection: errors, transactions,
 * reconnection, transactions in doubt) and backend_postgres_schema.c (the SQL,
 * the schema and its migrations, open and free). */
#ifndef OFFLINE_STORE_BACKEND_POSTGRES_H
#define OFFLINE_STORE_BACKEND_POSTGRES_H

#include <time.h>

#include <libpq-fe.h>

#include "backend.h"

/* The prepared statements (their SQL: backend_postgres_schema.c). */
enum {
	ST_QUEUE_GET, ST_QUEUE_LOCK, ST_STORE, ST_SCAN, ST_DEL_UPTO, ST_DEL_IDS, ST_LIST,
	ST_HOST_DEL, ST_EXPIRED_DEL, ST_OLDER_DEL, ST_USERS, ST_POP_DEL,
	ST_LEASE_SET, ST_LEASE_DEL, ST_HELD, ST_RELEASE, ST_RELEASE_ALL, ST_RENEW, ST_OLDEST,
	ST__COUNT
};

typedef struct {
	PGconn *conn;
	PGresult *live;  /* a result being emitted; freed at once if an emit raised */
	int ready;       /* this session is set up: timeouts, schema checked, statements prepared */
	int schema_ok;   /* the schema was checked (once per store) */
	int pid;         /* the server process of the connection (its last good one) */
	int backoff_ms;  /* 0, or the wait before the next reconnection attempt */
	struct timespec retry_at;
	char down[160];  /* why the last reconnection failed */
	/* A connection attempt under way (backend_postgres_conn.c): */
	int connecting;  /* PQconnectStart or PQresetStart was called; not connected yet */
	int resetting;   /* it is a reconnection (PQresetPoll), else the first (PQconnectPoll) */
	int polling;     /* what libpq's poll function last returned (PostgresPollingStatusType) */
	int inline_left_ms;  /* how long calls may still wait for it, in all */
	int attempt_ms;  /* how long an attempt may take (connect_timeout) */
	int64_t started_ms, give_up_ms; /* when it began, and when it counts as failed */
} pg;

static inline int result_ok(const PGresult *r) {
	ExecStatusType st = PQresultStatus(r); /* NULL gives PGRES_FATAL_ERROR */
	return st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK;
}

/* backend_postgres.c */
OS_HIDDEN extern const os_backend postgres_backend;

/* backend_postgres_conn.c */
OS_HIDDEN void pg_tidy(char *dst, size_t size, const char *src);
OS_HIDDEN int pgfail(os_store *s, pg *g, const PGresult *r);
/* The integer code of a SQLSTATE (its five characters read in base 36), as errcode holds it. */
OS_HIDDEN int pg_sqlstate_code(const char *state);
OS_HIDDEN int pg_command(pg *g, const char *sql);
OS_HIDDEN int pg_begin(os_store *s, pg *g);
OS_HIDDEN int pg_abort_tx(os_store *s, pg *g, const PGresult *r);
OS_HIDDEN int pg_commit(os_store *s, pg *g);
OS_HIDDEN int pg_commit_xid(os_store *s, pg *g, int64_t xid, int unknown);
OS_HIDDEN void pg_quiet(void *arg, const char *message);
OS_HIDDEN int pg_recover(os_store *s, pg *g);
OS_HIDDEN void pg_abandon(os_store *s);
OS_HIDDEN int pg_first_connect(os_store *s, pg *g);

/* backend_postgres_schema.c */
OS_HIDDEN int pg_setup(os_store *s, pg *g);
OS_HIDDEN void pg_free(pg *g);

#endif
