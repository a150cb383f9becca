/* The postgres backend's internals, shared by its files:
 * backend_postgres.c (the operations, and how they stay exact under
 * concurrency), backend_postgres_lease.c (take, and the lease updates),
 * backend_postgres_batch.c (group commit),
 * backend_postgres_conn.c (the connection: errors, transactions,
 * reconnection, transactions in doubt) and backend_postgres_schema.c (the SQL,
 * the schema and its migrations, open and free). */
#ifndef OFFLINE_STORE_BACKEND_POSTGRES_H
#define OFFLINE_STORE_BACKEND_POSTGRES_H

#include <limits.h>
#include <stdio.h>
#include <time.h>

#include <libpq-fe.h>

#include "backend.h"
#include "buffer.h"

/* The prepared statements (their SQL: backend_postgres_schema.c). */
enum {
	ST_QUEUE_GET, ST_QUEUE_LOCK, ST_STORE, ST_STORE_ID, ST_SCAN, ST_DEL_UPTO, ST_DEL_IDS, ST_LIST,
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
	int64_t batch_xid; /* the open batch's transaction (backend_postgres_batch.c) */
	os_buf log;        /* the open batch's stores, to store again after a deadlock */
	/* The batch's pipelined stores (db:send; backend_postgres_batch.c): */
	size_t sent;       /* stores sent (db:send) in this batch */
	size_t inflight;   /* the last of them, whose outcomes are not read yet */
	int piping;        /* the connection is in pipeline mode, with those in it */
	int pre;           /* 2: the batch's BEGIN went out with them, unanswered */
	int short_waits;   /* the batch's transaction waits GIVE_WAY_AFTER for a row at most */
	int holding;       /* this batch holds its sends back until their outcomes are needed */
	size_t held;       /* how many it holds */
	size_t held_at;    /* where the log holds the first of those */
	int ordered;       /* how many batches from now on hold theirs (after one gave way) */
	size_t settled;    /* outcomes db:outcome may read (those of a committed batch) */
	os_buf out;        /* an os_outcome per send */
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

/* Statement parameters, every one binary. */
#define MAX_PARAMS 11

typedef struct {
	int n, too_big;
	const char *val[MAX_PARAMS];
	int len[MAX_PARAMS], fmt[MAX_PARAMS];
	char num[MAX_PARAMS][8];
} params;

static inline void put_be64(char *b, int64_t v) {
	uint64_t u = (uint64_t)v;
	int i;
	for (i = 7; i >= 0; i--, u >>= 8)
		b[i] = (char)(u & 0xff);
}

static inline int64_t get_be64(const char *b) {
	uint64_t u = 0;
	int i;
	for (i = 0; i < 8; i++)
		u = (u << 8) | (unsigned char)b[i];
	return u <= INT64_MAX ? (int64_t)u : -(int64_t)(~u) - 1;
}

static inline void p_bytes(params *p, const char *b, size_t n) {
	if (n > INT_MAX)
		p->too_big = 1, n = 0;
	p->val[p->n] = b ? b : "";
	p->len[p->n] = (int)n;
	p->fmt[p->n++] = 1;
}

static inline void p_i64(params *p, int64_t v) {
	put_be64(p->num[p->n], v);
	p_bytes(p, p->num[p->n], 8);
}

static inline void p_null(params *p) {
	p->val[p->n] = NULL;
	p->len[p->n] = 0;
	p->fmt[p->n++] = 1;
}

static inline void p_key(params *p, const os_key *k) {
	p->n = p->too_big = 0;
	p_bytes(p, k->host.p, k->host.n);
	p_bytes(p, k->user.p, k->user.n);
}


static inline PGresult *run(pg *g, int which, const params *p) {
	char name[32];
	snprintf(name, sizeof name, "offline_store_%d", which);
	return PQexecPrepared(g->conn, name, p->n, p->val, p->len, p->fmt, 1);
}

static inline int64_t col_i64(const PGresult *r, int row, int col) {
	if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 8)
		return 0;
	return get_be64(PQgetvalue(r, row, col));
}

static inline os_str col_str(const PGresult *r, int row, int col) {
	os_str v;
	v.p = PQgetvalue(r, row, col);
	v.n = (size_t)PQgetlength(r, row, col);
	return v;
}

/* backend_postgres.c */
OS_HIDDEN extern const os_backend postgres_backend;
OS_HIDDEN void pg_read_item(const PGresult *r, int row, os_item *it);
/* An int8[] in binary, for `= ANY($n::int8[])` (malloc'd, *size bytes); NULL when out of memory. */
OS_HIDDEN char *pg_id_array(const int64_t *ids, size_t n, size_t *size);
OS_HIDDEN int pg_ids_param(os_store *s, pg *g, params *p, const int64_t *ids, size_t n, char **a);
/* One store in the open transaction (a batch's) or its own; fixed_id > 0: with that id. */
OS_HIDDEN int pg_store_once(os_store *s, pg *g, const os_key *k, const os_item *m, const os_limit *lim,
                            int64_t fixed_id, int64_t *count, int64_t *id, int64_t *evicted);

/* The parameters of ST_STORE (fixed_id 0) or ST_STORE_ID; 0 when a string is too large. */
OS_HIDDEN int pg_store_params(params *p, const os_key *k, const os_item *m, const os_limit *lim,
                              int64_t fixed_id);
/* What ST_STORE's result says: OS_OK (*count, *id), OS_LIMIT or OS_DUP (*count). */
OS_HIDDEN int pg_store_outcome(const PGresult *r, int64_t *count, int64_t *id);

/* backend_postgres_batch.c */
typedef struct {
	int rc;
	int64_t count, id;
} os_outcome;
OS_HIDDEN int pg_batch_begin(os_store *s);
OS_HIDDEN int pg_batch_end(os_store *s, int commit);
OS_HIDDEN int pg_batch_send(os_store *s, const os_key *k, const os_item *m, const os_limit *lim);
OS_HIDDEN int pg_batch_outcome(os_store *s, size_t i, int64_t *count, int64_t *id);
OS_HIDDEN int pg_batch_store(os_store *s, const os_key *k, const os_item *m, const os_limit *lim,
                             int64_t *count, int64_t *id, int64_t *evicted);

/* backend_postgres_lease.c */
OS_HIDDEN int pg_take(os_store *s, const os_key *k, os_str owner, int64_t now, int64_t until,
                      int64_t max, os_emit_item emit, void *ud, int64_t *expired, int64_t *held);
OS_HIDDEN int pg_release(os_store *s, const os_key *k, os_str owner, int64_t *touched);
OS_HIDDEN int pg_release_all(os_store *s, const os_str *prefix, int64_t *touched);
OS_HIDDEN int pg_renew(os_store *s, os_str prefix, int64_t until, int64_t *touched);

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
