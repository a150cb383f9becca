/* The postgres backend's group commit: the stores of a batch run in one
 * transaction (each still one statement, one round trip, as in 2. of
 * backend_postgres.c), committed by one COMMIT, so a batch of N stores costs
 * N + 2 round trips and one WAL flush instead of N of each.
 *
 * Pipelined (db:send). A store whose caller can wait for its outcome until the
 * commit is sent in libpq's pipeline mode without waiting for the answer:
 * PostgreSQL runs it while the caller goes on with the next message, and the
 * answers of all of them are read in one go before the COMMIT (a Sync, then
 * the results in order). A batch of N sends costs 3 round trips. The limit's
 * decision is the same as a store's made at once: the server runs the
 * statements in the order they were sent, each under the user's row lock.
 * Eviction is not pipelined (its walk needs several statements); a store made
 * at once in a batch with sends pending reads their outcomes first.
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
	int64_t slot; /* a send's index (its outcome is read later); -1: a store made at once (id) */
	size_t host_n, user_n, from_n, xml_n, meta_n, dedup_n;
	int has_meta, has_dedup, evict;
} logged;

static int log_store(pg *g, const os_key *k, const os_item *m, const os_limit *lim, int64_t id,
                     int64_t slot) {
	logged e;
	memset(&e, 0, sizeof e);
	e.ts = m->ts, e.expire = m->expire, e.id = id, e.slot = slot;
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

static os_outcome *outcomes(const pg *g) {
	return (os_outcome *)(void *)g->out.p;
}

/* Reads the outcomes of the stores sent since the last call (the last
 * g->unread of them) and leaves pipeline mode. OS_OK; or OS_FAIL with the
 * first failure recorded: the transaction is aborted, or the connection lost
 * (then libpq leaves pipeline mode when it reconnects). */
static int drain(os_store *s, pg *g) {
	size_t slot = g->sent - g->unread, nulls = 0;
	int rc = OS_OK;
	if (!g->piping)
		return OS_OK;
	g->piping = 0, g->unread = 0;
	if (!PQpipelineSync(g->conn))
		return pgfail(s, g, NULL);
	for (;;) {
		PGresult *r = PQgetResult(g->conn);
		ExecStatusType st;
		if (!r) { /* the end of one statement's results; twice in a row: the connection is gone */
			if (++nulls > 1 || PQstatus(g->conn) != CONNECTION_OK)
				return rc == OS_OK ? pgfail(s, g, NULL) : rc;
			continue;
		}
		nulls = 0;
		st = PQresultStatus(r);
		if (st == PGRES_PIPELINE_SYNC) {
			PQclear(r);
			break;
		}
		if (st == PGRES_TUPLES_OK && slot < g->sent) {
			os_outcome *o = &outcomes(g)[slot];
			o->rc = pg_store_outcome(r, &o->count, &o->id);
		} else if (st != PGRES_PIPELINE_ABORTED && rc == OS_OK) {
			rc = pgfail(s, g, r);
		}
		slot++;
		PQclear(r);
	}
	if (!PQexitPipelineMode(g->conn) && rc == OS_OK)
		rc = pgfail(s, g, NULL);
	return rc;
}

/* Ends the batch after a failure: rolls back what is left of it. */
static int give_up(os_store *s, pg *g) {
	char why[sizeof s->errmsg];
	int code = s->errcode;
	memcpy(why, s->errmsg, sizeof why);
	if (g->piping)
		drain(s, g); /* (its failure is not the one to report) */
	if (PQstatus(g->conn) == CONNECTION_OK && PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		pg_command(g, "ROLLBACK");
	s->in_batch = 0;
	g->batch_xid = 0;
	g->sent = g->settled = 0;
	os_buf_reset(&g->log, LOG_KEEP);
	memcpy(s->errmsg, why, sizeof why);
	s->errcode = code;
	return OS_FAIL;
}

/* Whether the failure just recorded is one that storing the batch again settles. */
static int retryable(const os_store *s, const pg *g) {
	return PQstatus(g->conn) == CONNECTION_OK &&
	       (s->errcode == pg_sqlstate_code("40P01") || s->errcode == pg_sqlstate_code("23505"));
}

/* Rolls back and stores the batch's stores again: those made at once each
 * with its id (*changed when one came out otherwise: no use trying again),
 * the sends afresh, their outcomes recorded. */
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
		int64_t count = 0, id = 0, evicted;
		int rc;
		log_read(g, &at, &e, &k, &m, &lim);
		rc = pg_store_once(s, g, &k, &m, &lim, e.slot >= 0 ? 0 : e.id, &count, &id, &evicted);
		if (rc == OS_FAIL)
			return OS_FAIL;
		if (e.slot >= 0) {
			os_outcome *o = &outcomes(g)[e.slot];
			o->rc = rc, o->count = count, o->id = id;
		} else if (rc != OS_OK || id != e.id) {
			return *changed = 1, os_fail(s, pg_sqlstate_code("40P01"), "a deadlock rolled back a batch of offline "
			               "messages, and one of them could not be stored again as it was (SQLSTATE 40P01)");
		}
	}
	return OS_OK;
}

/* After a failure inside the batch (its transaction is over: every store of
 * it is undone): stores the batch again when that can settle it, up to
 * RETRIES times in all (*tries); else gives up. */
static int retry(os_store *s, pg *g, int *tries) {
	int changed = 0;
	do {
		if (changed || !retryable(s, g) || ++*tries > RETRIES)
			return give_up(s, g);
	} while (replay(s, g, &changed) != OS_OK);
	return OS_OK;
}

/* Reads the outcomes of the sends still unread. */
static int settle(os_store *s, pg *g, int *tries) {
	if (g->unread == 0 || drain(s, g) == OS_OK)
		return OS_OK;
	return retry(s, g, tries);
}

/* db:begin() */
int pg_batch_begin(os_store *s) {
	pg *g = s->impl;
	if (pg_recover(s, g) != OS_OK)
		return OS_FAIL;
	os_buf_reset(&g->log, LOG_KEEP);
	os_buf_reset(&g->out, LOG_KEEP);
	g->sent = g->unread = g->settled = 0;
	return begin_xid(s, g);
}

/* db:store() inside a batch: joins its transaction (no recover step: that
 * would roll it back). */
int pg_batch_store(os_store *s, const os_key *k, const os_item *m, const os_limit *lim,
                   int64_t *count, int64_t *id, int64_t *evicted) {
	pg *g = s->impl;
	int rc, tries = 0;
	if (settle(s, g, &tries) != OS_OK)
		return OS_FAIL;
	while ((rc = pg_store_once(s, g, k, m, lim, 0, count, id, evicted)) == OS_FAIL)
		if (retry(s, g, &tries) != OS_OK)
			return OS_FAIL;
	if (rc == OS_OK && !log_store(g, k, m, lim, *id, -1)) {
		os_fail(s, 0, "out of memory");
		return give_up(s, g);
	}
	return rc;
}

/* db:send(): the store goes out now, its outcome is read before the commit. */
int pg_batch_send(os_store *s, const os_key *k, const os_item *m, const os_limit *lim) {
	pg *g = s->impl;
	os_outcome none = { OS_FAIL, 0, 0 };
	params p;
	char name[32];
	if (!pg_store_params(&p, k, m, lim, 0)) {
		os_fail(s, 0, "a string is too large to store");
		return give_up(s, g);
	}
	if (!log_store(g, k, m, lim, 0, (int64_t)g->sent) || !os_buf_add(&g->out, &none, sizeof none)) {
		os_fail(s, 0, "out of memory");
		return give_up(s, g);
	}
	if (!g->piping) {
		if (!PQenterPipelineMode(g->conn)) {
			pgfail(s, g, NULL);
			return give_up(s, g);
		}
		g->piping = 1;
	}
	snprintf(name, sizeof name, "offline_store_%d", ST_STORE);
	g->sent++, g->unread++;
	if (!PQsendQueryPrepared(g->conn, name, p.n, p.val, p.len, p.fmt, 1) || PQflush(g->conn) != 0) {
		pgfail(s, g, NULL);
		return give_up(s, g);
	}
	return OS_OK;
}

/* db:commit() (commit = 1) and db:rollback(). */
int pg_batch_end(os_store *s, int commit) {
	pg *g = s->impl;
	int rc = OS_OK, tries = 0;
	if (!commit) {
		if (g->piping)
			drain(s, g);
		if (PQstatus(g->conn) == CONNECTION_OK && PQtransactionStatus(g->conn) != PQTRANS_IDLE)
			pg_command(g, "ROLLBACK");
	} else {
		/* core.c ended the batch before this call; reading the sends and storing
		 * them again (a deadlock) still happen inside it */
		s->in_batch = 1;
		rc = settle(s, g, &tries);
		s->in_batch = 0;
		if (rc != OS_OK)
			return OS_FAIL; /* (given up: rolled back) */
		/* In doubt and the server cannot tell: reported as failed. */
		rc = pg_commit_xid(s, g, g->batch_xid, OS_FAIL);
	}
	g->settled = commit && rc == OS_OK ? g->sent : 0;
	g->batch_xid = 0;
	os_buf_reset(&g->log, LOG_KEEP);
	return rc;
}

/* db:outcome(i) */
int pg_batch_outcome(os_store *s, size_t i, int64_t *count, int64_t *id) {
	pg *g = s->impl;
	os_outcome o;
	if (i >= g->settled)
		return OS_FAIL;
	memcpy(&o, g->out.p + i * sizeof o, sizeof o);
	*count = o.count, *id = o.id;
	return o.rc;
}
