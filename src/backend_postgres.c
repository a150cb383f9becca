/* The PostgreSQL backend's operations (libpq): one connection per open store, any number
 * of server nodes on one database. Same shape as the sqlite backend: a
 * per-user counter row in offline_queue (count, bytes) changes in the same
 * transaction as every insert and delete, and every statement is prepared
 * once per connection (again after a reconnect).
 *
 * Concurrency: exact across processes, at READ COMMITTED, without retries
 * (but for group commit's batches, which may deadlock and store again:
 * backend_postgres_batch.c).
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
 *    id order is the commit order (but for a batch stored again after a
 *    deadlock: backend_postgres_batch.c). A pop locks the row and only then takes
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
 *    their user's lock, so no two of these transactions can deadlock (a
 *    batch can: backend_postgres_batch.c).
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
 * 7. Eviction (store with lim->evict_oldest, when the one-statement store
 *    found no room): one transaction that locks the queue row (as pop does),
 *    reads the counter and then the queue's front in id order, a page at a
 *    time, until the unleased rows read make room; deletes exactly those ids
 *    (ST_DEL_IDS, whose counter change is what its DELETE returned); and runs
 *    the store statement again, under the lock, so nobody can fill the room
 *    in between. Leases are only taken under the same lock, so a row read
 *    free stays free until the commit.
 *
 * Failures and transactions in doubt: backend_postgres_conn.c. The SQL:
 * backend_postgres_schema.c. */
#define _POSIX_C_SOURCE 200809L /* struct timespec in backend_postgres.h */

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_postgres.h"


void pg_read_item(const PGresult *r, int row, os_item *it) {
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

/* Sets $3 of p (after the key) to the int8[] of ids, in *a (the caller frees
 * it after the statement); out of memory: rolls back, OS_FAIL. */
int pg_ids_param(os_store *s, pg *g, params *p, const int64_t *ids, size_t n, char **a) {
	size_t size;
	if (!(*a = pg_id_array(ids, n, &size))) {
		os_fail(s, 0, "out of memory");
		pg_command(g, "ROLLBACK");
		return OS_FAIL;
	}
	p->n = 2;
	p_bytes(p, *a, size);
	return OS_OK;
}

/* Begins a transaction and locks k's queue row (ST_QUEUE_LOCK, with p set to
 * the key): OS_OK with *r its result (no row: no queue), or OS_FAIL, rolled back. */
static int begin_locked(os_store *s, pg *g, const os_key *k, params *p, PGresult **r) {
	if (pg_begin(s, g) != OS_OK)
		return OS_FAIL;
	p_key(p, k);
	*r = run(g, ST_QUEUE_LOCK, p);
	if (result_ok(*r))
		return OS_OK;
	pg_abort_tx(s, g, *r);
	PQclear(*r);
	*r = NULL;
	return OS_FAIL;
}

/* Rows of the queue's front that eviction reads per statement, beyond those it
 * needs for the count (leased rows are passed over: a delivery page at most). */
#define EVICT_PAGE 128

/* Eviction's walk (see 7. above), inside the transaction, with the queue row
 * locked: the ids of the oldest unleased rows that make room for xml_n bytes
 * into *ids (malloc'd, *n of them; none when the queue has room already or
 * when they do not make it: the store statement then decides). On failure the
 * transaction is rolled back. */
static int evict_ids(os_store *s, pg *g, const os_key *k, const os_limit *lim, size_t xml_n,
                     int64_t **ids, int64_t *n) {
	PGresult *r;
	params p;
	int64_t c, b, after = 0, cap = 0, want, *grown;
	int i, rows;
	p_key(&p, k);
	r = run(g, ST_QUEUE_GET, &p);
	if (!result_ok(r))
		goto fail;
	c = PQntuples(r) == 1 ? col_i64(r, 0, 0) : 0;
	b = PQntuples(r) == 1 ? col_i64(r, 0, 1) : 0;
	PQclear(r);
	want = lim->max_count != OS_NONE && c + 1 > lim->max_count ? c + 1 - lim->max_count : 0;
	do {
		p.n = 2;
		p_i64(&p, after);
		p_i64(&p, want + EVICT_PAGE);
		r = run(g, ST_OLDEST, &p);
		if (!result_ok(r))
			goto fail;
		rows = PQntuples(r);
		for (i = 0; i < rows && os_over_limit(lim, c, b, xml_n); i++) {
			after = col_i64(r, i, 0);
			if (!os_evict_row(&c, &b, col_i64(r, i, 1), PQgetvalue(r, i, 2)[0] != 0))
				continue;
			if (*n == cap) {
				cap = 2 * cap + want + 16;
				if (!(grown = realloc(*ids, (size_t)cap * sizeof *grown))) {
					os_fail(s, 0, "out of memory");
					goto fail;
				}
				*ids = grown;
			}
			(*ids)[(*n)++] = after;
		}
		PQclear(r);
	} while (rows == want + EVICT_PAGE && os_over_limit(lim, c, b, xml_n));
	if (os_over_limit(lim, c, b, xml_n))
		*n = 0;
	return OS_OK;
fail:
	if (result_ok(r))
		pg_command(g, "ROLLBACK");
	else
		pg_abort_tx(s, g, r);
	PQclear(r);
	return OS_FAIL;
}

/* The store statement again, in one transaction with the eviction that makes
 * room for it (see 7. above): its own, or the open batch's (s->in_batch).
 * store_p: its parameters, for statement `which`. */
static int store_evicting(os_store *s, pg *g, const os_key *k, int which, const params *store_p,
                          const os_limit *lim, size_t xml_n, int64_t *count, int64_t *id,
                          int64_t *evicted) {
	PGresult *r = NULL;
	params p;
	int64_t xid, *ids = NULL, n = 0;
	int rc, in_tx = s->in_batch;
	if (in_tx) {
		p_key(&p, k);
		r = run(g, ST_QUEUE_LOCK, &p);
		if (!result_ok(r))
			goto fail;
	} else if (begin_locked(s, g, k, &p, &r) != OS_OK) {
		return OS_FAIL;
	}
	xid = PQntuples(r) == 1 ? col_i64(r, 0, 1) : 0; /* (no row: emptied meanwhile) */
	PQclear(r);
	r = NULL;
	if (evict_ids(s, g, k, lim, xml_n, &ids, &n) != OS_OK) {
		rc = OS_FAIL;
		goto done;
	}
	/* (a batch keeps what it stored before if this store refuses after all) */
	if (n > 0 && in_tx && !pg_command(g, "SAVEPOINT offline_store_evict"))
		goto fail;
	if (n > 0) {
		char *a;
		if ((rc = pg_ids_param(s, g, &p, ids, (size_t)n, &a)) != OS_OK)
			goto done;
		r = run(g, ST_DEL_IDS, &p);
		free(a);
		if (!result_ok(r))
			goto fail;
		PQclear(r);
	}
	r = run(g, which, store_p);
	if (!result_ok(r))
		goto fail;
	if (PQntuples(r) != 1 || PQgetisnull(r, 0, 1)) { /* no room after all, or a duplicate */
		rc = PQntuples(r) == 1 && PQgetvalue(r, 0, 2)[0] ? OS_DUP : OS_LIMIT;
		if (!in_tx)
			pg_command(g, "ROLLBACK");
		else if (n > 0 && !pg_command(g, "ROLLBACK TO SAVEPOINT offline_store_evict"))
			goto fail;
		goto done;
	}
	*count = col_i64(r, 0, 0);
	*id = col_i64(r, 0, 1);
	PQclear(r);
	r = NULL;
	/* In doubt and the server cannot tell: reported as failed. (A batch's
	 * commit: backend_postgres_batch.c.) */
	if ((rc = in_tx ? OS_OK : pg_commit_xid(s, g, xid, OS_FAIL)) == OS_OK)
		*evicted = n;
	goto done;
fail:
	rc = pg_abort_tx(s, g, r);
done:
	free(ids);
	PQclear(r);
	return rc;
}

static int dedup_violation(const PGresult *r) {
	const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE),
	           *constraint = PQresultErrorField(r, PG_DIAG_CONSTRAINT_NAME);
	return state && strcmp(state, "23505") == 0 && constraint &&
	       strcmp(constraint, "offline_message_dedup") == 0;
}

/* The parameters of ST_STORE (fixed_id 0) or ST_STORE_ID; 0 when a string is too large. */
int pg_store_params(params *p, const os_key *k, const os_item *m, const os_limit *lim, int64_t fixed_id) {
	p_key(p, k);
	p_i64(p, m->ts);
	if (m->expire == OS_NONE)
		p_null(p);
	else
		p_i64(p, m->expire);
	p_bytes(p, m->from.p, m->from.n);
	p_bytes(p, m->xml.p, m->xml.n);
	if (m->meta.p)
		p_bytes(p, m->meta.p, m->meta.n);
	else
		p_null(p);
	if (lim->max_count == OS_NONE)
		p_null(p);
	else
		p_i64(p, lim->max_count);
	if (lim->max_bytes == OS_NONE)
		p_null(p);
	else
		p_i64(p, lim->max_bytes);
	if (m->dedup.p)
		p_bytes(p, m->dedup.p, m->dedup.n);
	else
		p_null(p);
	if (fixed_id > 0)
		p_i64(p, fixed_id);
	return !p->too_big;
}

/* The outcome in ST_STORE's row: stored (count and id), refused by the limit
 * or a duplicate (*count the queue's count). */
int pg_store_outcome(const PGresult *r, int64_t *count, int64_t *id) {
	if (PQntuples(r) != 1)
		return *count = 0, OS_LIMIT;
	if (!PQgetisnull(r, 0, 1)) {
		*count = col_i64(r, 0, 0);
		*id = col_i64(r, 0, 1);
		return OS_OK;
	}
	*count = col_i64(r, 0, 3);
	return PQgetvalue(r, 0, 2)[0] ? OS_DUP : OS_LIMIT;
}

int pg_store_once(os_store *s, pg *g, const os_key *k, const os_item *m, const os_limit *lim,
                  int64_t fixed_id, int64_t *count, int64_t *id, int64_t *evicted) {
	PGresult *r = NULL;
	params p;
	int rc, which = fixed_id > 0 ? ST_STORE_ID : ST_STORE;
	*evicted = 0;
	if (!pg_store_params(&p, k, m, lim, fixed_id))
		return os_fail(s, 0, "a string is too large to store");
	r = run(g, which, &p);
	if (!result_ok(r)) {
		/* In a batch the error ended the transaction: failed (the batch stores
		 * again, and then finds the key: backend_postgres_batch.c). */
		if (!dedup_violation(r) || s->in_batch) {
			rc = pgfail(s, g, r);
			goto done;
		}
		rc = OS_DUP; /* another writer stored the key first (see 5. above) */
	} else if ((rc = pg_store_outcome(r, count, id)) != OS_LIMIT || !lim->evict_oldest ||
	           os_never_fits(lim, m->xml.n)) {
		goto done; /* (refused: *count is the queue's, from the same row) */
	} else {
		PQclear(r);
		r = NULL;
		rc = store_evicting(s, g, k, which, &p, lim, m->xml.n, count, id, evicted);
		if (rc != OS_LIMIT)
			goto done;
		p_key(&p, k); /* (for the count below) */
	}
	/* Refused after all: nothing was written; report the count as it is now. */
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

static int pg_store(os_store *s, const os_key *k, const os_item *m, const os_limit *lim,
                    int64_t *count, int64_t *id, int64_t *evicted) {
	pg *g = s->impl;
	if (s->in_batch)
		return pg_batch_store(s, k, m, lim, count, id, evicted);
	*evicted = 0;
	if (pg_recover(s, g) != OS_OK)
		return OS_FAIL;
	return pg_store_once(s, g, k, m, lim, 0, count, id, evicted);
}

/* An int8[] in binary, for `= ANY($n::int8[])`: ndim, has-nulls, element type
 * (int8 = 20), length, lower bound, then (length, value) per element. NULL when
 * out of memory; *size its bytes. */
char *pg_id_array(const int64_t *ids, size_t n, size_t *size) {
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


static int pg_count(os_store *s, const os_key *k, int64_t *count, int64_t *bytes) {
	pg *g = s->impl;
	PGresult *r;
	params p;
	int rc = OS_OK;
	if (pg_recover(s, g) != OS_OK)
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
	if (pg_recover(s, g) != OS_OK)
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
		pg_read_item(r, i, &it);
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
	if (pg_recover(s, g) != OS_OK)
		return OS_FAIL;
	if (begin_locked(s, g, k, &p, &r) != OS_OK)
		return OS_FAIL;
	if (PQntuples(r) == 0) { /* no queue, no messages */
		rc = pg_commit(s, g);
		goto done;
	}
	xid = col_i64(r, 0, 1);
	PQclear(r);
	p_bytes(&p, arg, (size_t)arg_n);
	r = run(g, which, &p);
	if (!result_ok(r))
		goto fail;
	*touched = col_i64(r, 0, 0);
	rc = pg_commit_xid(s, g, xid, OS_FAIL);
	if (rc != OS_OK)
		*touched = 0;
	goto done;
fail:
	rc = pg_abort_tx(s, g, r);
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
	if (!(a = pg_id_array(ids, n, &size)))
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
	if (pg_recover(s, g) != OS_OK)
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
	if (pg_recover(s, g) != OS_OK)
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


static void pg_close(os_store *s) {
	pg *g = s->impl;
	if (g) {
		os_buf_free(&g->log);
		os_buf_free(&g->out);
	}
	pg_free(g);
	s->impl = NULL;
}

const os_backend postgres_backend = {
	.name = "postgres",
	.store = pg_store,
	.take = pg_take,
	.release = pg_release,
	.release_all = pg_release_all,
	.renew = pg_renew,
	.count = pg_count,
	.list = pg_list,
	.remove = pg_remove,
	.remove_user = pg_remove_user,
	.remove_host = pg_remove_host,
	.delete_expired = pg_delete_expired,
	.delete_older_than = pg_delete_older_than,
	.users = pg_users,
	.close = pg_close,
	.batch_begin = pg_batch_begin,
	.batch_end = pg_batch_end,
	.store_send = pg_batch_send,
	.outcome = pg_batch_outcome,
	.abandon = pg_abandon,
};
