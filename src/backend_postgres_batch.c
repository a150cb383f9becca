/* The postgres backend's group commit: the stores of a batch run in one
 * transaction (each still one statement, one round trip, as in 2. of
 * backend_postgres.c), committed by one COMMIT, so a batch of N stores costs
 * N + 2 round trips and one WAL flush instead of N of each. (Stores are not
 * pipelined: the caller needs each one's answer, the limit's decision, before
 * it handles the next message.)
 *
 * Deadlocks. A batch holds the queue row of every user it stored to until it
 * commits, and takes them in the order the messages came, so two batches (two
 * nodes, or a batch and a bulk delete) can wait for each other. PostgreSQL
 * then aborts one of the transactions (SQLSTATE 40P01, after deadlock_timeout,
 * 1 s by default). The batch that lost keeps a copy of every store it made
 * (the log below), so it rolls back, begins again and stores them again with
 * the ids they had (ST_STORE_ID): nobody has been told about them (the plugin
 * says nothing before the commit), and the ids the caller was given stay
 * true. Then it runs the store that met the deadlock again. (Such an id is
 * older than those the other batch drew and committed meanwhile for the same
 * user: the exception to "id order is commit order" in 3. of
 * backend_postgres.c. Nothing deletes by id range without reading under the
 * user's lock first, so a pop in between misses it only until the next one.) A store that comes
 * out differently the second time (the other node filled the queue meanwhile)
 * cannot be stored again as promised: the batch fails as a whole, as any
 * failed store of a batch does. The same goes for a store that met another
 * writer's copy of its dedup key in the unique index (an error that ends the
 * transaction): stored again, it finds the key and is a duplicate.
 *
 * In doubt: the batch's transaction id is read at its BEGIN, so a COMMIT
 * whose answer is lost with the connection is resolved as pop's is
 * (pg_commit_xid); when the server cannot tell, the batch is reported failed:
 * its messages may be stored although their senders are told otherwise. */
#define _POSIX_C_SOURCE 200809L /* struct timespec in backend_postgres.h */

#include <stdlib.h>
#include <string.h>

#include "backend_postgres.h"

#define RETRIES 3              /* times a batch is stored again after deadlocks */
#define LOG_KEEP (1024 * 1024) /* log memory kept between batches */

/* One store of the batch, as the log holds it: this, then its strings (host,
 * user, from, xml, meta, dedup) back to back. */
typedef struct {
	int64_t ts, expire, id, max_count, max_bytes;
	size_t host_n, user_n, from_n, xml_n, meta_n, dedup_n;
	int has_meta, has_dedup, evict;
} logged;

static int log_store(pg *g, const os_key *k, const os_item *m, const os_limit *lim, int64_t id) {
	logged e;
	memset(&e, 0, sizeof e);
	e.ts = m->ts, e.expire = m->expire, e.id = id;
	e.max_count = lim->max_count, e.max_bytes = lim->max_bytes, e.evict = lim->evict_oldest;
	e.host_n = k->host.n, e.user_n = k->user.n, e.from_n = m->from.n, e.xml_n = m->xml.n;
	e.has_meta = m->meta.p != NULL, e.meta_n = m->meta.p ? m->meta.n : 0;
	e.has_dedup = m->dedup.p != NULL, e.dedup_n = m->dedup.p ? m->dedup.n : 0;
	return os_buf_add(&g->log, &e, sizeof e) && os_buf_add(&g->log, k->host.p, e.host_n) &&
	       os_buf_add(&g->log, k->user.p, e.user_n) && os_buf_add(&g->log, m->from.p, e.from_n) &&
	       os_buf_add(&g->log, m->xml.p, e.xml_n) && os_buf_add(&g->log, m->meta.p, e.meta_n) &&
	       os_buf_add(&g->log, m->dedup.p, e.dedup_n);
}

/* Reads the entry at *at into e, k, m and lim (pointing into the log); moves *at past it. */
static void log_read(const pg *g, size_t *at, logged *e, os_key *k, os_item *m, os_limit *lim) {
	const char *p = g->log.p + *at + sizeof *e;
	memcpy(e, g->log.p + *at, sizeof *e);
	memset(m, 0, sizeof *m);
	k->host.p = p, k->host.n = e->host_n, p += e->host_n;
	k->user.p = p, k->user.n = e->user_n, p += e->user_n;
	m->from.p = p, m->from.n = e->from_n, p += e->from_n;
	m->xml.p = p, m->xml.n = e->xml_n, p += e->xml_n;
	m->meta.p = e->has_meta ? p : NULL, m->meta.n = e->meta_n, p += e->meta_n;
	m->dedup.p = e->has_dedup ? p : NULL, m->dedup.n = e->dedup_n, p += e->dedup_n;
	m->ts = e->ts, m->expire = e->expire;
	lim->max_count = e->max_count, lim->max_bytes = e->max_bytes, lim->evict_oldest = e->evict;
	*at = (size_t)(p - g->log.p);
}

/* BEGIN, and the transaction's id (one round trip). */
static int begin_xid(os_store *s, pg *g) {
	PGresult *r = PQexec(g->conn, "BEGIN; SELECT txid_current()");
	int rc = OS_OK;
	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
		g->batch_xid = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	else
		rc = pg_abort_tx(s, g, r);
	PQclear(r);
	return rc;
}

/* Ends the batch after a failure: rolls back what is left of it. */
static int give_up(os_store *s, pg *g) {
	if (PQstatus(g->conn) == CONNECTION_OK && PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		pg_command(g, "ROLLBACK");
	s->in_batch = 0;
	g->batch_xid = 0;
	os_buf_reset(&g->log, LOG_KEEP);
	return OS_FAIL;
}

/* Whether the failure just recorded is one that storing the batch again settles. */
static int retryable(const os_store *s, const pg *g) {
	return PQstatus(g->conn) == CONNECTION_OK &&
	       (s->errcode == pg_sqlstate_code("40P01") || s->errcode == pg_sqlstate_code("23505"));
}

/* Rolls back and stores the batch's stores again, each with its id; *changed
 * when one came out otherwise (no use trying again). */
static int replay(os_store *s, pg *g, int *changed) {
	size_t at = 0;
	if (PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		pg_command(g, "ROLLBACK");
	if (begin_xid(s, g) != OS_OK)
		return OS_FAIL;
	while (at < g->log.n) {
		logged e;
		os_key k;
		os_item m;
		os_limit lim;
		int64_t count, id = 0, evicted;
		int rc;
		log_read(g, &at, &e, &k, &m, &lim);
		rc = pg_store_once(s, g, &k, &m, &lim, e.id, &count, &id, &evicted);
		if (rc == OS_FAIL)
			return OS_FAIL;
		if (rc != OS_OK || id != e.id)
			return *changed = 1, os_fail(s, pg_sqlstate_code("40P01"), "a deadlock rolled back a batch of offline "
			               "messages, and one of them could not be stored again as it was (SQLSTATE 40P01)");
	}
	return OS_OK;
}

/* db:begin() */
int pg_batch_begin(os_store *s) {
	pg *g = s->impl;
	if (pg_recover(s, g) != OS_OK)
		return OS_FAIL;
	os_buf_reset(&g->log, LOG_KEEP);
	return begin_xid(s, g);
}

/* db:store() inside a batch: joins its transaction (no recover step: that
 * would roll it back). */
int pg_batch_store(os_store *s, const os_key *k, const os_item *m, const os_limit *lim,
                   int64_t *count, int64_t *id, int64_t *evicted) {
	pg *g = s->impl;
	int rc, tries = 0, changed = 0;
	while ((rc = pg_store_once(s, g, k, m, lim, 0, count, id, evicted)) == OS_FAIL) {
		/* (the transaction is over: every earlier store of the batch is undone) */
		do {
			if (changed || !retryable(s, g) || ++tries > RETRIES)
				return give_up(s, g);
		} while (replay(s, g, &changed) != OS_OK);
	}
	if (rc == OS_OK && !log_store(g, k, m, lim, *id)) {
		os_fail(s, 0, "out of memory");
		return give_up(s, g);
	}
	return rc;
}

/* db:commit() (commit = 1) and db:rollback(). */
int pg_batch_end(os_store *s, int commit) {
	pg *g = s->impl;
	int rc = OS_OK;
	if (commit)
		/* In doubt and the server cannot tell: reported as failed. */
		rc = pg_commit_xid(s, g, g->batch_xid, OS_FAIL);
	else if (PQstatus(g->conn) == CONNECTION_OK && PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		pg_command(g, "ROLLBACK");
	g->batch_xid = 0;
	os_buf_reset(&g->log, LOG_KEEP);
	return rc;
}
