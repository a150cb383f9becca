/* The postgres backend's group commit: the stores of a batch run in one
 * transaction, committed by one COMMIT, so a batch costs one WAL flush
 * instead of one per message.
 *
 * Pipelined (db:send). A store whose caller can wait for its outcome until the
 * commit is sent in libpq's pipeline mode without waiting for the answer (the
 * batch's first one with its BEGIN): PostgreSQL runs it while the caller goes
 * on with the next message, and the answers of all of them are read in one go
 * before the COMMIT (a Sync, then the results in order). A batch of sends
 * costs 2 round trips. The limit's decision is the same as a store's made at
 * once: the server runs the statements in the order they were sent, each
 * under the user's row lock. Eviction is not pipelined (its walk needs several
 * statements); a store made at once (db:store) reads the outcomes of the sends
 * in flight first.
 *
 * Lock order. A batch holds the queue row of every user it stored to until it
 * commits. Sends go out in the order the messages came, so two batches (two
 * nodes) could each wait for a row the other holds; instead, a batch that
 * begins with a send waits GIVE_WAY_AFTER for a row at most (lock_timeout for
 * its transaction only): a send kept waiting longer fails (55P03), and its
 * batch gives way: rolls back, begins again and stores its sends again sorted
 * by user (lock_order), now waiting as any statement does (up to the
 * session's lock_timeout). Batches that take
 * rows in one order cannot deadlock each other, and a waiting batch holds
 * nothing a batch that gave way wants. The next ORDERED batches of a
 * connection that gave way hold their sends back and send them in lock order
 * when their outcomes are needed (no overlap with the caller then, but no
 * second try either): nodes that meet each other's rows take turns instead of
 * timing out again.
 *
 * Storing again. The batch keeps a copy of every store it made (the log
 * below), so after giving way, or after a deadlock (SQLSTATE 40P01, after
 * deadlock_timeout, 1 s by default: stores made at once still take rows in the
 * order they come, as do sends of a batch that began with one), it stores them
 * again: those made at once with the ids they had (ST_STORE_ID), first, in
 * their order; nobody has been told about them (the plugin says nothing
 * before the commit), and the ids the caller was given stay true. (Such an id
 * is older than those the other batch drew and committed meanwhile for the
 * same user: the exception to "id order is commit order" in 3. of
 * backend_postgres.c. Nothing deletes by id range without reading under the
 * user's lock first, so a pop in between misses it only until the next one.)
 * A store that comes out differently the second time (the other node filled
 * the queue meanwhile) cannot be stored again as promised: the batch fails as
 * a whole, as any failed store of a batch does. Sends are decided afresh. A
 * store that met another writer's copy of its dedup key in the unique index
 * (an error that ends the transaction) is stored again the same way: it finds
 * the key and is a duplicate.
 *
 * In doubt: the batch's transaction id comes with its BEGIN's answer, read
 * before the COMMIT goes, so a COMMIT
 * whose answer is lost with the connection is resolved as pop's is
 * (pg_commit_xid); when the server cannot tell, the batch is reported failed:
 * its messages may be stored although their senders are told otherwise. */
#define _POSIX_C_SOURCE 200809L /* struct timespec in backend_postgres.h */

#include <stdlib.h>
#include <string.h>

#include "backend_postgres.h"

#define RETRIES 3              /* times a batch is stored again (gave way, deadlock, dedup key) */
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

/* How long a store sent at once may wait for a user's queue row that another
 * transaction holds before its batch gives way (see "Lock order" above). */
#define GIVE_WAY_AFTER "10ms"
/* How many batches after one that gave way hold their sends back, to send
 * them in lock order at the commit. */
#define ORDERED 64

/* A send, as the outcomes are read: its user (for the lock order) and slot,
 * and where the log holds it. */
typedef struct {
	os_str host, user;
	int64_t slot;
	size_t at;
} unsent;

static int str_cmp(os_str a, os_str b) {
	int c = memcmp(a.p, b.p, a.n < b.n ? a.n : b.n);
	return c ? c : (a.n > b.n) - (a.n < b.n);
}

/* The order in which a batch that gave way takes the users' queue rows: by
 * host and user, and a user's sends in the order they came. */
static int lock_order(const void *a, const void *b) {
	const unsent *x = a, *y = b;
	int c = str_cmp(x->host, y->host);
	if (!c)
		c = str_cmp(x->user, y->user);
	return c ? c : (x->slot > y->slot) - (x->slot < y->slot);
}

/* Sends BEGIN and reads nothing: its answer and the transaction's id come
 * with the statements' (read_results); `give_way` bounds the batch's lock
 * waits to GIVE_WAY_AFTER. */
static int send_begin(pg *g, int give_way) {
	return PQsendQueryParams(g->conn, "BEGIN", 0, NULL, NULL, NULL, NULL, 0) &&
	       PQsendQueryParams(g->conn, give_way ? "SELECT txid_current(), set_config('lock_timeout', '"
	                                             GIVE_WAY_AFTER "', true)"
	                                           : "SELECT txid_current()",
	                         0, NULL, NULL, NULL, NULL, 0);
}

/* Syncs the pipeline and reads what it answers: `pre` answers of send_begin
 * (0 or 2), then n stores' (the outcomes of the sends in slots q[0..n-1],
 * or, with q NULL, of slots first..first+n-1), and leaves pipeline mode.
 * OS_OK; or OS_FAIL with the first failure recorded: the transaction is
 * aborted, or the connection lost (libpq leaves pipeline mode when it
 * reconnects; pg_recover reconnects one left in it). */
static int read_results(os_store *s, pg *g, size_t pre, size_t n, const unsent *q, size_t first) {
	size_t k = 0, nulls = 0;
	int rc = OS_OK;
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
		if (k < pre && st == (k == 0 ? PGRES_COMMAND_OK : PGRES_TUPLES_OK)) {
			if (k == 1)
				g->batch_xid = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
		} else if (k >= pre && k < pre + n && st == PGRES_TUPLES_OK) {
			os_outcome *o = &outcomes(g)[q ? (size_t)q[k - pre].slot : first + k - pre];
			o->rc = pg_store_outcome(r, &o->count, &o->id);
		} else if (st != PGRES_PIPELINE_ABORTED && rc == OS_OK) {
			rc = pgfail(s, g, r);
		}
		k++;
		PQclear(r);
	}
	if (!PQexitPipelineMode(g->conn) && rc == OS_OK)
		rc = pgfail(s, g, NULL);
	return rc;
}

/* Reads the outcomes of the sends in flight. */
static int drain(os_store *s, pg *g) {
	size_t pre = g->pre, n = g->inflight;
	if (!g->piping)
		return OS_OK;
	g->piping = 0, g->pre = 0, g->inflight = 0;
	return read_results(s, g, pre, n, NULL, g->sent - n);
}

/* Stores `count` sends of the batch, those from the log's offset `at` on (the
 * ones held back, or all of them again), in lock order, in one pipeline,
 * beginning the transaction first when it is not. */
static int send_sorted(os_store *s, pg *g, size_t at, size_t count) {
	size_t n = 0, i, pre = g->batch_xid ? 0 : 2;
	unsent *q;
	char name[32];
	int rc = OS_OK;
	g->held = 0;
	if (count == 0)
		return OS_OK;
	if (!(q = malloc(count * sizeof *q)))
		return os_fail(s, 0, "out of memory");
	while (at < g->log.n) {
		logged e;
		os_key key;
		os_item m;
		os_limit lim;
		size_t this = at;
		log_read(g, &at, &e, &key, &m, &lim);
		if (e.slot >= 0 && n < count) {
			q[n].at = this, q[n].host = key.host, q[n].user = key.user, q[n].slot = e.slot;
			n++;
		}
	}
	qsort(q, n, sizeof *q, lock_order);
	if (!PQenterPipelineMode(g->conn) || (pre && !send_begin(g, 0)))
		rc = pgfail(s, g, NULL);
	snprintf(name, sizeof name, "offline_store_%d", ST_STORE);
	for (i = 0; i < n && rc == OS_OK; i++) {
		logged e;
		os_key key;
		os_item m;
		os_limit lim;
		params p;
		at = q[i].at;
		log_read(g, &at, &e, &key, &m, &lim);
		pg_store_params(&p, &key, &m, &lim, 0); /* (checked by pg_batch_send) */
		if (!PQsendQueryPrepared(g->conn, name, p.n, p.val, p.len, p.fmt, 1))
			rc = pgfail(s, g, NULL);
	}
	if (rc == OS_OK)
		rc = read_results(s, g, pre, n, q, 0);
	free(q);
	return rc;
}

/* Ends the batch after a failure: rolls back what is left of it. */
static int give_up(os_store *s, pg *g) {
	char why[sizeof s->errmsg];
	int code = s->errcode;
	memcpy(why, s->errmsg, sizeof why);
	if (g->piping)
		drain(s, g); /* (its failure is not the one to report) */
	g->held = 0;
	if (PQstatus(g->conn) == CONNECTION_OK && PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		pg_command(g, "ROLLBACK");
	s->in_batch = 0;
	g->batch_xid = 0;
	g->sent = g->settled = 0;
	g->short_waits = 0;
	os_buf_reset(&g->log, LOG_KEEP);
	memcpy(s->errmsg, why, sizeof why);
	s->errcode = code;
	return OS_FAIL;
}

/* Whether the failure just recorded is a statement of a batch with short
 * lock waits that waited too long (SQLSTATE 55P03): the batch gives way. */
static int gave_way(const os_store *s, const pg *g) {
	return g->short_waits && s->errcode == pg_sqlstate_code("55P03");
}

/* Whether the failure just recorded is one that storing the batch again settles. */
static int retryable(const os_store *s, const pg *g) {
	return PQstatus(g->conn) == CONNECTION_OK &&
	       (s->errcode == pg_sqlstate_code("40P01") || s->errcode == pg_sqlstate_code("23505") ||
	        gave_way(s, g));
}

/* Rolls back and stores the batch's stores again: those made at once each
 * with its id, in the order they came (*changed when one came out otherwise:
 * no use trying again), then the sends afresh, in lock order, their outcomes
 * recorded. */
static int replay(os_store *s, pg *g, int *changed) {
	size_t at = 0;
	g->short_waits = 0;
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
		if (e.slot >= 0)
			continue;
		rc = pg_store_once(s, g, &k, &m, &lim, e.id, &count, &id, &evicted);
		if (rc == OS_FAIL)
			return OS_FAIL;
		if (rc != OS_OK || id != e.id)
			return *changed = 1, os_fail(s, pg_sqlstate_code("40P01"), "a batch of offline messages was rolled back "
			               "to be stored again (a deadlock, or a wait for a row), and one of them could not "
			               "be stored again as it was (SQLSTATE 40P01)");
	}
	return send_sorted(s, g, 0, g->sent);
}

/* After a failure inside the batch (its transaction is over: every store of
 * it is undone): stores the batch again when that can settle it, up to
 * RETRIES times in all (*tries); else gives up. */
static int retry(os_store *s, pg *g, int *tries) {
	int changed = 0;
	if (gave_way(s, g))
		g->ordered = ORDERED;
	do {
		if (changed || !retryable(s, g) || ++*tries > RETRIES)
			return give_up(s, g);
	} while (replay(s, g, &changed) != OS_OK);
	return OS_OK;
}

/* Reads the outcomes of the sends in flight, or sends those held back and
 * reads theirs. A batch that gave way holds its sends back in the batches
 * after it (ORDERED). */
static int settle(os_store *s, pg *g, int *tries) {
	int rc = g->piping ? drain(s, g) : g->held ? send_sorted(s, g, g->held_at, g->held) : OS_OK;
	return rc == OS_OK ? OS_OK : retry(s, g, tries);
}

/* db:begin(): no round trip; BEGIN goes with the batch's first statement. */
int pg_batch_begin(os_store *s) {
	pg *g = s->impl;
	if (pg_recover(s, g) != OS_OK)
		return OS_FAIL;
	os_buf_reset(&g->log, LOG_KEEP);
	os_buf_reset(&g->out, LOG_KEEP);
	g->sent = g->inflight = g->settled = g->held = 0;
	g->piping = g->pre = g->short_waits = 0;
	g->batch_xid = 0;
	g->holding = g->ordered > 0;
	if (g->holding)
		g->ordered--;
	return OS_OK;
}

/* db:store() inside a batch: joins its transaction (no recover step: that
 * would roll it back). */
int pg_batch_store(os_store *s, const os_key *k, const os_item *m, const os_limit *lim,
                   int64_t *count, int64_t *id, int64_t *evicted) {
	pg *g = s->impl;
	int rc, tries = 0;
	if (settle(s, g, &tries) != OS_OK)
		return OS_FAIL;
	if (!g->batch_xid && begin_xid(s, g) != OS_OK)
		return give_up(s, g);
	while ((rc = pg_store_once(s, g, k, m, lim, 0, count, id, evicted)) == OS_FAIL)
		if (retry(s, g, &tries) != OS_OK)
			return OS_FAIL;
	if (rc == OS_OK && !log_store(g, k, m, lim, *id, -1)) {
		os_fail(s, 0, "out of memory");
		return give_up(s, g);
	}
	return rc;
}

/* db:send(): the store goes out now (the batch's first with its BEGIN), its
 * outcome is read before the commit; or, in a batch that holds its sends
 * back, it waits in the log until then. */
int pg_batch_send(os_store *s, const os_key *k, const os_item *m, const os_limit *lim) {
	pg *g = s->impl;
	os_outcome none = { OS_FAIL, 0, 0 };
	params p;
	char name[32];
	size_t at = g->log.n;
	if (!pg_store_params(&p, k, m, lim, 0)) {
		os_fail(s, 0, "a string is too large to store");
		return give_up(s, g);
	}
	if (!log_store(g, k, m, lim, 0, (int64_t)g->sent) || !os_buf_add(&g->out, &none, sizeof none)) {
		os_fail(s, 0, "out of memory");
		return give_up(s, g);
	}
	g->sent++;
	if (g->holding) {
		if (g->held++ == 0)
			g->held_at = at;
		return OS_OK;
	}
	if (!g->piping) {
		if (!PQenterPipelineMode(g->conn)) {
			pgfail(s, g, NULL);
			return give_up(s, g);
		}
		g->piping = 1;
		if (!g->batch_xid) {
			g->pre = 2, g->short_waits = 1;
			if (!send_begin(g, 1)) {
				pgfail(s, g, NULL);
				return give_up(s, g);
			}
		}
	}
	snprintf(name, sizeof name, "offline_store_%d", ST_STORE);
	g->inflight++;
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
		g->held = 0;
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
		/* In doubt and the server cannot tell: reported as failed. Nothing
		 * begun (an empty batch): nothing to commit. */
		if (g->batch_xid)
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
