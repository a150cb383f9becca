/* The sqlite backend's group commit. Under group commit a store reads its
 * counter row (the limit needs it) and defers the rest: a batch's rows are
 * written together (up to 256 rows or 1 MB at a time) by multi-row INSERTs of
 * 32 rows, and the counters by UPDATEs of their sums (sq_flush_pending), which
 * saves most of sqlite's per-statement work and runs its code in one burst per
 * batch.
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

#include "backend_sqlite.h"

void sq_cache_clear(ccache *c) {
	os_table_clear(&c->t, centry_free);
}

static int centry_is(const os_link *l, const void *k) {
	const centry *e = (const centry *)l;
	return os_key_is(e->key, e->host_n, e->user_n, k);
}

centry *sq_cache_find(ccache *c, const os_key *k, uint64_t h) {
	return (centry *)os_table_find(&c->t, h, centry_is, k);
}

/* Caches a counter row (out of memory: it is just not cached). */
void sq_cache_put(ccache *c, const os_key *k, uint64_t h, int64_t qid, int64_t count,
                  int64_t bytes) {
	centry *e;
	if (c->t.n >= CACHE_MAX)
		sq_cache_clear(c);
	if (c->t.n >= c->t.nbucket && os_table_grow(&c->t) != 0 && !c->t.bucket)
		return; /* (a table that cannot grow just gets longer chains) */
	if (!(e = malloc(sizeof *e + k->host.n + k->user.n)))
		return;
	e->link.hash = h, e->qid = qid, e->count = count, e->bytes = bytes;
	e->host_n = k->host.n, e->user_n = k->user.n;
	os_key_copy(e->key, k);
	os_table_add(&c->t, &e->link);
}

/* Forgets k's counter row, before an operation that changes it. */
void sq_cache_drop(ccache *c, const os_key *k) {
	os_link **slot;
	if (!c->t.bucket)
		return;
	slot = os_table_slot(&c->t, os_key_hash(k), centry_is, k);
	if (*slot) {
		os_link *e = *slot;
		os_table_unlink(&c->t, slot);
		free(e);
	}
}

/* Binds a message row to ?(base + 1) .. ?(base + 8) of an insert; SQLITE_OK or
 * the error. */
int sq_bind_row(sqlite3_stmt *st, int base, const msg_row *r) {
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
				r->xml.p = p->arena.p + r->xml_at;
				r->from.p = p->arena.p + r->from_at; /* (unused when own_from) */
				r->meta.p = r->meta_at < 0 ? NULL : p->arena.p + r->meta_at;
				r->dedup.p = r->dedup_at < 0 ? NULL : p->arena.p + r->dedup_at;
				if ((rc = sq_bind_row(st, 8 * i, r)) != SQLITE_OK)
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
int sq_flush_pending(sq *q) {
	pending *p = &q->pend;
	int rc = write_rows(q, 0, p->n_msg);
	if (rc == SQLITE_DONE)
		rc = write_rows(q, 1, p->n_queue);
	p->n_msg = p->n_queue = 0;
	os_buf_reset(&p->arena, ARENA_KEEP); /* (a chunk of big stanzas gives the memory back) */
	return rc;
}

/* Copies n bytes into the arena; their offset, or -1 when out of memory.
 * (The arena exists after any call, so that no pointer into it is NULL.) */
long long sq_arena_add(pending *p, const char *data, size_t n) {
	size_t at = p->arena.n;
	return os_buf_add(&p->arena, data, n) ? (long long)at : -1;
}

/* The batch's pending increment of queue qid, or NULL. */
pend_queue *sq_pending_queue(pending *p, int64_t qid) {
	int i;
	for (i = 0; i < p->n_queue; i++)
		if (p->queue[i].qid == qid)
			return &p->queue[i];
	return NULL;
}

/* A failed store rolls back its transaction: inside a batch, the whole batch. */
int sq_store_abort(os_store *s, sq *q) {
	s->in_batch = 0;
	return sq_abort_tx(s, q);
}

/* Defers a batch's store of row r (counted into an existing queue when `add`):
 * copies its strings into the arena, and writes the chunk once it is full. */
int sq_defer_store(os_store *s, sq *q, msg_row *r, int add) {
	pending *p = &q->pend;
	int oom = (r->xml_at = sq_arena_add(p, r->xml.p, r->xml.n)) < 0;
	r->from_at = r->meta_at = 0;
	if (!r->own_from)
		oom |= (r->from_at = sq_arena_add(p, r->from.p, r->from.n)) < 0;
	if (r->meta.p)
		oom |= (r->meta_at = sq_arena_add(p, r->meta.p, r->meta.n)) < 0;
	else
		r->meta_at = -1;
	if (r->dedup.p)
		oom |= (r->dedup_at = sq_arena_add(p, r->dedup.p, r->dedup.n)) < 0;
	else
		r->dedup_at = -1;
	if (oom) {
		s->in_batch = 0;
		sq_recover(q);
		return os_fail(s, SQLITE_NOMEM, "out of memory");
	}
	p->msg[p->n_msg++] = *r;
	if (add) {
		pend_queue *pq = sq_pending_queue(p, r->qid);
		if (!pq) {
			pq = &p->queue[p->n_queue++];
			pq->qid = r->qid, pq->count = pq->bytes = 0;
		}
		pq->count++;
		pq->bytes += (int64_t)r->xml.n;
	}
	if ((p->n_msg == CHUNK || p->arena.n >= ARENA_KEEP) && sq_flush_pending(q) != SQLITE_DONE)
		return sq_store_abort(s, q);
	return OS_OK;
}

/* Whether queue qid holds a row with dedup key d, among the rows the batch holds
 * back and in the file: SQLITE_ROW if so, SQLITE_DONE if not, or the error. */
int sq_dedup_held(sq *q, int64_t qid, os_str d) {
	const pending *p = &q->pend;
	sqlite3_stmt *st;
	int i, rc;
	for (i = 0; i < p->n_msg; i++) {
		const msg_row *r = &p->msg[i];
		if (r->qid == qid && r->dedup_at >= 0 && r->dedup.n == d.n &&
		    memcmp(p->arena.p + r->dedup_at, d.p, d.n) == 0)
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
