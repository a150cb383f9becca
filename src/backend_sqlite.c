/* The sqlite backend's operations: one file, WAL, every statement prepared once
 * at open. A per-user row in `queue` holds the message count and stanza bytes and
 * is updated in the same transaction as every insert and delete, so the limit
 * check in store() reads one row instead of counting the queue. The layout and
 * its versions: backend_sqlite_schema.c; group commit and the counter cache:
 * backend_sqlite_batch.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_sqlite.h"

static int sqfail(os_store *s, sqlite3 *db) {
	return os_fail(s, sqlite3_extended_errcode(db), "%s", sqlite3_errmsg(db));
}

static int bind_key(sqlite3_stmt *st, const os_key *k) {
	int rc = bind_text(st, 1, k->host);
	return rc == SQLITE_OK ? bind_text(st, 2, k->user) : rc;
}

/* Forgets what the open transaction did (sqlite may have rolled it back
 * already): the writes it deferred, and the counters cached since, which may
 * count its stores. */
static void forget_tx(sq *q) {
	q->pend.n_msg = q->pend.n_queue = 0;
	os_buf_reset(&q->pend.arena, ARENA_KEEP);
	sq_cache_clear(&q->cache);
}

/* The recover step (backend.h's cleanup rule): rolls back the open transaction,
 * if any, and resets any statement left stepping (both left by a call abandoned
 * when an emit callback raised: a read statement left active would hold on to
 * its snapshot). Also the plain rollback of a call that failed. */
void sq_recover(sq *q) {
	sqlite3_stmt *st = NULL;
	while ((st = sqlite3_next_stmt(q->db, st)))
		if (sqlite3_stmt_busy(st))
			sqlite3_reset(st);
	if (!sqlite3_get_autocommit(q->db) || q->pend.n_msg > 0) {
		forget_tx(q);
		if (!sqlite3_get_autocommit(q->db))
			run(stmt(q, ST_ROLLBACK));
	}
}

int sq_abort_tx(os_store *s, sq *q);

/* Starts a write transaction, first rolling back one left open by a call
 * that was abandoned (an emit callback raised); forgets the counter cache
 * when another connection has written since the last one. */
static int begin(os_store *s, sq *q) {
	sqlite3_stmt *st;
	int rc;
	q->id_read = q->id_dirty = 0;
	sq_recover(q);
	if (run(stmt(q, ST_BEGIN)) != SQLITE_DONE)
		return sqfail(s, q->db);
	st = stmt(q, ST_DATA_VERSION);
	if ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		int64_t v = sqlite3_column_int64(st, 0);
		if (v != q->cache.data_version)
			sq_cache_clear(&q->cache);
		q->cache.data_version = v;
	}
	sqlite3_reset(st);
	if (rc != SQLITE_ROW)
		return sq_abort_tx(s, q);
	return OS_OK;
}

/* Records the failure, then rolls back (which may change the error). */
int sq_abort_tx(os_store *s, sq *q) {
	sqfail(s, q->db);
	forget_tx(q);
	sq_recover(q);
	return OS_FAIL;
}

static int commit(os_store *s, sq *q) {
	if (sq_flush_pending(q) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	if (q->id_dirty) {
		sqlite3_stmt *st = stmt(q, ST_ID_BUMP);
		sqlite3_bind_int64(st, 1, q->last_id);
		if (run(st) != SQLITE_DONE)
			return sq_abort_tx(s, q);
	}
	q->id_read = q->id_dirty = 0;
	if (run(stmt(q, ST_COMMIT)) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	return OS_OK;
}

/* The next message id, inside the open write transaction (which holds the
 * lock on the sequence row until commit() writes the last one back). */
static int next_id(sq *q, int64_t *id) {
	if (!q->id_read) {
		sqlite3_stmt *st = stmt(q, ST_ID_GET);
		int rc = sqlite3_step(st);
		if (rc != SQLITE_ROW) {
			sqlite3_reset(st);
			return rc == SQLITE_DONE ? SQLITE_CORRUPT : rc;
		}
		q->last_id = sqlite3_column_int64(st, 0);
		sqlite3_reset(st);
		q->id_read = 1;
	}
	*id = ++q->last_id;
	q->id_dirty = 1;
	return SQLITE_OK;
}

/* Reads the counter row: its id (0 when there is none: an empty queue), the
 * count and the bytes. */
static int queue_get(sq *q, const os_key *k, int64_t *qid, int64_t *count, int64_t *bytes) {
	sqlite3_stmt *st = stmt(q, ST_QUEUE_GET);
	int rc;
	*qid = *count = *bytes = 0;
	if ((rc = bind_key(st, k)) != SQLITE_OK)
		return rc;
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*qid = sqlite3_column_int64(st, 0);
		*count = sqlite3_column_int64(st, 1);
		*bytes = sqlite3_column_int64(st, 2);
		rc = SQLITE_DONE;
	}
	sqlite3_reset(st);
	return rc;
}

/* Runs a statement whose ?1 is a queue id; SQLITE_DONE on success. */
static int run_qid(sq *q, int which, int64_t qid) {
	sqlite3_stmt *st = stmt(q, which);
	sqlite3_bind_int64(st, 1, qid);
	return run(st);
}

/* Subtracts from the counter row and drops it when it reaches zero. */
static int queue_sub(sq *q, int64_t qid, int64_t count, int64_t bytes) {
	sqlite3_stmt *st;
	int rc;
	if (count == 0)
		return SQLITE_DONE;
	st = stmt(q, ST_QUEUE_SUB);
	sqlite3_bind_int64(st, 1, qid);
	sqlite3_bind_int64(st, 2, count);
	sqlite3_bind_int64(st, 3, bytes);
	if ((rc = run(st)) != SQLITE_DONE)
		return rc;
	return run_qid(q, ST_QUEUE_DROP_IF_EMPTY, qid);
}

/* Counts a message of `bytes` into the counter row `*qid`, creating the row
 * (and setting *qid) when there is none. */
static int queue_add(sq *q, const os_key *k, int64_t *qid, int64_t bytes) {
	sqlite3_stmt *st;
	int rc;
	if (*qid != 0) {
		st = stmt(q, ST_QUEUE_ADD);
		sqlite3_bind_int64(st, 1, *qid);
		sqlite3_bind_int64(st, 2, 1);
		sqlite3_bind_int64(st, 3, bytes);
		return run(st);
	}
	st = stmt(q, ST_QUEUE_NEW);
	if ((rc = bind_key(st, k)) != SQLITE_OK)
		return rc;
	sqlite3_bind_int64(st, 3, bytes);
	if ((rc = run(st)) == SQLITE_DONE)
		*qid = sqlite3_last_insert_rowid(q->db);
	return rc;
}

/* The sender is nearly always the stanza's own from attribute: storing it
 * again would cost a fifth of the row. Such a sender is stored as a
 * zero-length BLOB (a real sender, even an empty one, is TEXT) and read back
 * from the XML. from_in_xml finds from='...' (or "...") on the top element of
 * XML as util.stanza writes it; values with an entity are never elided, so
 * what it returns is the raw value, pointing into xml. 1 if found. */
static int from_in_xml(os_str xml, os_str *from) {
	const char *p = xml.p, *end = xml.p + xml.n;
	if (p == end || *p++ != '<')
		return 0;
	while (p < end && *p != ' ' && *p != '/' && *p != '>') /* the element name */
		p++;
	while (p < end && *p == ' ') {
		const char *name = ++p, *value;
		size_t namelen;
		char quote;
		while (p < end && *p != '=' && *p != ' ' && *p != '>')
			p++;
		if (p + 1 >= end || *p != '=' || (p[1] != '\'' && p[1] != '"'))
			return 0;
		namelen = (size_t)(p - name);
		quote = p[1];
		value = p += 2;
		if (!(p = memchr(value, quote, (size_t)(end - value))) ||
		    memchr(value, '&', (size_t)(p - value)) || memchr(value, '<', (size_t)(p - value)))
			return 0; /* unterminated, or an entity: not the simple form */
		if (namelen == 4 && memcmp(name, "from", 4) == 0) {
			from->p = value;
			from->n = (size_t)(p - value);
			return 1;
		}
		p++;
	}
	return 0;
}

/* Makes room in queue qid (holding *count messages of *bytes) for a message of
 * xml_n bytes by deleting its oldest unleased rows (backend.h's walk), inside
 * the open write transaction, so the rows it reads are the rows it deletes.
 * A batch's deferred rows are written first (they may be the oldest). *evicted:
 * how many went; SQLITE_DONE, NO_ROOM when no room can be made (nothing
 * deleted), or the error. */
#define NO_ROOM (-1)
static int evict_oldest(sq *q, int64_t qid, const os_limit *lim, size_t xml_n, int64_t *count,
                        int64_t *bytes, int64_t *evicted) {
	sqlite3_stmt *st;
	int64_t c = *count, b = *bytes, n = 0, last = 0;
	int rc = SQLITE_DONE;
	if (q->pend.n_msg > 0 && (rc = sq_flush_pending(q)) != SQLITE_DONE)
		return rc;
	st = stmt(q, ST_MSG_OLDEST);
	sqlite3_bind_int64(st, 1, qid);
	while (os_over_limit(lim, c, b, xml_n) && (rc = sqlite3_step(st)) == SQLITE_ROW) {
		last = sqlite3_column_int64(st, 0);
		n += os_evict_row(&c, &b, sqlite3_column_int64(st, 1), sqlite3_column_int(st, 2));
	}
	sqlite3_reset(st);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return rc;
	if (os_over_limit(lim, c, b, xml_n))
		return NO_ROOM;
	st = stmt(q, ST_MSG_EVICT);
	sqlite3_bind_int64(st, 1, qid);
	sqlite3_bind_int64(st, 2, last);
	if ((rc = run(st)) != SQLITE_DONE)
		return rc;
	st = stmt(q, ST_QUEUE_SUB);
	sqlite3_bind_int64(st, 1, qid);
	sqlite3_bind_int64(st, 2, n);
	sqlite3_bind_int64(st, 3, *bytes - b);
	if ((rc = run(st)) != SQLITE_DONE)
		return rc;
	*count = c, *bytes = b, *evicted = n;
	return SQLITE_DONE;
}

/* In a batch (s->in_batch) the store joins the open transaction: it neither
 * begins nor commits, and a refusal by the limit leaves the batch as it was
 * (the refusal is decided before anything is written). The batch's rows are
 * written a chunk at a time (sq_defer_store); the limit counts them meanwhile. */
static int sq_store(os_store *s, const os_key *k, const os_item *m, const os_limit *lim,
                    int64_t *count, int64_t *id, int64_t *evicted) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	msg_row r;
	int64_t bytes;
	uint64_t h = os_key_hash(k);
	centry *cached;
	os_str own;
	int add, rc = OS_OK;
	*evicted = 0;
	if (!s->in_batch && begin(s, q) != OS_OK)
		return OS_FAIL;
	if ((cached = sq_cache_find(&q->cache, k, h))) {
		r.qid = cached->qid, *count = cached->count, bytes = cached->bytes;
	} else {
		if (queue_get(q, k, &r.qid, count, &bytes) != SQLITE_DONE)
			return sq_store_abort(s, q);
		if (s->in_batch && r.qid != 0) {
			const pend_queue *pq = sq_pending_queue(&q->pend, r.qid);
			if (pq)
				*count += pq->count, bytes += pq->bytes;
		}
	}
	if (m->dedup.p && r.qid != 0 && (rc = sq_dedup_held(q, r.qid, m->dedup)) != SQLITE_DONE) {
		if (rc != SQLITE_ROW)
			return sq_store_abort(s, q);
		rc = OS_DUP;
	} else if (os_over_limit(lim, *count, bytes, m->xml.n)) {
		rc = OS_LIMIT;
		if (lim->evict_oldest && r.qid != 0 && !os_never_fits(lim, m->xml.n)) {
			int e = evict_oldest(q, r.qid, lim, m->xml.n, count, &bytes, evicted);
			if (e != SQLITE_DONE && e != NO_ROOM)
				return sq_store_abort(s, q);
			if (e == SQLITE_DONE)
				rc = OS_OK;
		}
	}
	if (rc == OS_DUP || rc == OS_LIMIT) {
		if (!s->in_batch)
			run(stmt(q, ST_ROLLBACK)); /* (it wrote nothing) */
		return rc;
	}
	if (next_id(q, id) != SQLITE_OK)
		return sq_store_abort(s, q);
	r.id = *id, r.ts = m->ts, r.expire = m->expire;
	r.from = m->from, r.xml = m->xml, r.meta = m->meta, r.dedup = m->dedup;
	r.own_from = m->from.n > 0 && from_in_xml(m->xml, &own) && own.n == m->from.n &&
	             memcmp(own.p, m->from.p, own.n) == 0;
	*count += 1;
	/* a new queue's counter row is written at once: its id is the messages' key */
	add = s->in_batch && r.qid != 0;
	if (!add && queue_add(q, k, &r.qid, (int64_t)m->xml.n) != SQLITE_DONE)
		return sq_store_abort(s, q);
	if (cached) /* (as the transaction will leave it; a rollback forgets it) */
		cached->count = *count, cached->bytes = bytes + (int64_t)m->xml.n;
	else if (r.qid != 0)
		sq_cache_put(&q->cache, k, h, r.qid, *count, bytes + (int64_t)m->xml.n);
	if (s->in_batch)
		return sq_defer_store(s, q, &r, add);
	st = stmt(q, ST_MSG_INSERT);
	if (sq_bind_row(st, 0, &r) != SQLITE_OK || run(st) != SQLITE_DONE)
		return sq_store_abort(s, q);
	return commit(s, q);
}

static os_str column_str(sqlite3_stmt *st, int col) {
	os_str r;
	r.p = sqlite3_column_blob(st, col);
	r.n = (size_t)sqlite3_column_bytes(st, col);
	if (!r.p)
		r.p = "";
	return r;
}

static void read_item(sqlite3_stmt *st, os_item *it) {
	it->id = sqlite3_column_int64(st, 0);
	it->ts = sqlite3_column_int64(st, 1);
	it->expire = sqlite3_column_type(st, 2) == SQLITE_NULL ? OS_NONE
	                                                       : sqlite3_column_int64(st, 2);
	it->xml = column_str(st, 4);
	if (sqlite3_column_type(st, 3) == SQLITE_BLOB && sqlite3_column_bytes(st, 3) == 0) {
		/* elided at store: the stanza's own from='...' (see from_in_xml) */
		if (!from_in_xml(it->xml, &it->from))
			it->from.p = "", it->from.n = 0;
	} else {
		it->from = column_str(st, 3);
	}
	if (sqlite3_column_type(st, 5) == SQLITE_NULL)
		it->meta.p = NULL, it->meta.n = 0;
	else
		it->meta = column_str(st, 5);
	it->dedup.p = NULL, it->dedup.n = 0;
	if (sqlite3_column_type(st, 6) == SQLITE_NULL) {
		it->lease_owner.p = NULL, it->lease_owner.n = 0;
		it->lease_until = 0;
	} else {
		it->lease_owner = column_str(st, 6);
		it->lease_until = sqlite3_column_int64(st, 7);
	}
}

/* The end of the latest live lease on queue qid that is not owner's (owner.p
 * NULL: anybody's), into *held. */
static int held_until(sq *q, int64_t qid, int64_t now, os_str owner, int64_t *held) {
	sqlite3_stmt *st = stmt(q, ST_HELD);
	int rc = SQLITE_OK;
	sqlite3_bind_int64(st, 1, qid);
	sqlite3_bind_int64(st, 2, now);
	if (owner.p)
		rc = bind_blob(st, 3, owner);
	else
		sqlite3_bind_null(st, 3);
	if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
		if (sqlite3_column_type(st, 0) != SQLITE_NULL)
			*held = sqlite3_column_int64(st, 0);
		rc = SQLITE_DONE;
	}
	sqlite3_reset(st);
	return rc;
}

/* pop (owner.p NULL: deletes what it takes) and lease (sets owner and until on
 * it), as backend.h says. Both read the rows in id order under the write lock;
 * what they change is then a range of ids: pop deletes every row up to the last
 * it read but those set aside, lease deletes the expired rows up to there and
 * marks the free ones between the first and the last it took. */
static int sq_take(os_store *s, const os_key *k, os_str owner, int64_t now, int64_t until,
                int64_t max, os_emit_item emit, void *ud, int64_t *expired, int64_t *held) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	int64_t qid, count, bytes, gone_bytes = 0, returned = 0, first = 0, last = 0, last_taken = 0;
	int rc = SQLITE_DONE, stopped = 0;
	*expired = 0;
	*held = OS_NONE;
	/* Cheap read first: the broadcast fires on every login. */
	sq_recover(q);
	sq_cache_drop(&q->cache, k);
	if (queue_get(q, k, &qid, &count, &bytes) != SQLITE_DONE)
		return sqfail(s, q->db);
	if (count == 0)
		return OS_OK;
	/* (read again under the write lock: another connection may have changed it) */
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	if (queue_get(q, k, &qid, &count, &bytes) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	st = stmt(q, ST_MSG_SCAN);
	sqlite3_bind_int64(st, 1, qid);
	while ((max == OS_NONE || returned < max) && (rc = sqlite3_step(st)) == SQLITE_ROW) {
		os_item it;
		int what;
		read_item(st, &it);
		if ((what = os_take_what(&it, owner, now)) == OS_TAKE_SKIP)
			continue;
		if (what == OS_TAKE_EXPIRED) {
			(*expired)++;
			gone_bytes += (int64_t)it.xml.n;
			last = it.id;
			continue;
		}
		if (what == OS_TAKE_STOP) {
			stopped = 1;
			break;
		}
		it.lease_owner.p = NULL, it.lease_owner.n = 0, it.lease_until = 0;
		returned++;
		if (!first)
			first = it.id;
		last = last_taken = it.id;
		if (!owner.p)
			gone_bytes += (int64_t)it.xml.n;
		emit(ud, &it);
	}
	if (stopped || (max != OS_NONE && returned >= max))
		rc = SQLITE_DONE;
	sqlite3_reset(st);
	if (rc != SQLITE_DONE)
		return sq_abort_tx(s, q);
	if (stopped && returned == 0 && held_until(q, qid, now, owner, held) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	if (owner.p && returned > 0) {
		st = stmt(q, ST_MSG_LEASE);
		sqlite3_bind_int64(st, 1, qid);
		sqlite3_bind_int64(st, 2, first);
		sqlite3_bind_int64(st, 3, last_taken);
		sqlite3_bind_int64(st, 5, until);
		sqlite3_bind_int64(st, 6, now);
		if (bind_blob(st, 4, owner) != SQLITE_OK || run(st) != SQLITE_DONE)
			return sq_abort_tx(s, q);
	}
	if (last > 0 && (*expired > 0 || !owner.p)) {
		/* Inside BEGIN IMMEDIATE nobody else writes, so the rows up to the
		 * last id read are the rows read: pop deletes them but those set
		 * aside, lease the expired ones. */
		st = stmt(q, owner.p ? ST_MSG_DEL_EXPIRED_UPTO : ST_MSG_DEL_UPTO);
		sqlite3_bind_int64(st, 1, qid);
		sqlite3_bind_int64(st, 2, last);
		sqlite3_bind_int64(st, 3, now);
		if (run(st) != SQLITE_DONE ||
		    queue_sub(q, qid, *expired + (owner.p ? 0 : returned), gone_bytes) != SQLITE_DONE)
			return sq_abort_tx(s, q);
	}
	return commit(s, q);
}

/* Runs one of the lease updates whose ?1 is a prefix of the owner; *touched is
 * how many rows it changed. */
static int relet(os_store *s, int which, os_str prefix, int64_t until, int64_t *touched) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	*touched = 0;
	sq_recover(q);
	st = stmt(q, which);
	sqlite3_bind_int64(st, 2, (int64_t)prefix.n);
	sqlite3_bind_int64(st, 3, until);
	if (bind_blob(st, 1, prefix) != SQLITE_OK || run(st) != SQLITE_DONE)
		return sqfail(s, q->db);
	*touched = sqlite3_changes64(q->db);
	return OS_OK;
}

static int sq_release(os_store *s, const os_key *k, os_str owner, int64_t *touched) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	*touched = 0;
	sq_recover(q);
	st = stmt(q, ST_RELEASE);
	if (bind_key(st, k) != SQLITE_OK || bind_blob(st, 3, owner) != SQLITE_OK || run(st) != SQLITE_DONE)
		return sqfail(s, q->db);
	*touched = sqlite3_changes64(q->db);
	return OS_OK;
}

static int sq_release_all(os_store *s, const os_str *prefix, int64_t *touched) {
	os_str all = { "", 0 };
	return relet(s, ST_RELEASE_ALL, prefix ? *prefix : all, 0, touched);
}

static int sq_renew(os_store *s, os_str prefix, int64_t until, int64_t *touched) {
	return relet(s, ST_RENEW, prefix, until, touched);
}

static int sq_count(os_store *s, const os_key *k, int64_t *count, int64_t *bytes) {
	sq *q = s->impl;
	int64_t qid;
	sq_recover(q);
	if (queue_get(q, k, &qid, count, bytes) != SQLITE_DONE)
		return sqfail(s, q->db);
	return OS_OK;
}

static int sq_list(os_store *s, const os_key *k, int64_t after_id, int64_t max,
                   os_emit_item emit, void *ud) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	int64_t n = 0;
	int rc = SQLITE_DONE;
	sq_recover(q);
	st = stmt(q, ST_MSG_LIST);
	if (bind_key(st, k) != SQLITE_OK)
		return sqfail(s, q->db);
	sqlite3_bind_int64(st, 3, after_id);
	while ((max == OS_NONE || n < max) && (rc = sqlite3_step(st)) == SQLITE_ROW) {
		os_item it;
		read_item(st, &it);
		n++;
		emit(ud, &it);
	}
	if (rc == SQLITE_ROW)
		rc = SQLITE_DONE;
	sqlite3_reset(st);
	if (rc != SQLITE_DONE)
		return sqfail(s, q->db);
	return OS_OK;
}

static int sq_remove(os_store *s, const os_key *k, const int64_t *ids, size_t n,
                     int64_t *touched) {
	sq *q = s->impl;
	int64_t qid, count, bytes = 0;
	size_t i;
	*touched = 0;
	sq_cache_drop(&q->cache, k);
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	if (queue_get(q, k, &qid, &count, &bytes) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	bytes = 0;
	/* IDS_PER_STMT ids at a time: what they hold is counted, then deleted (a
	 * page confirmed costs a few statements, not one per row) */
	for (i = 0; qid != 0 && i < n; i += IDS_PER_STMT) {
		sqlite3_stmt *sum = stmt(q, ST_MSG_SUM_IDS), *del = stmt(q, ST_MSG_DEL_IDS);
		size_t j;
		int rc;
		sqlite3_bind_int64(sum, 1, qid);
		sqlite3_bind_int64(del, 1, qid);
		for (j = 0; j < IDS_MAX; j++) {
			if (j < IDS_PER_STMT && i + j < n) {
				sqlite3_bind_int64(sum, (int)j + 2, ids[i + j]);
				sqlite3_bind_int64(del, (int)j + 2, ids[i + j]);
			} else {
				sqlite3_bind_null(sum, (int)j + 2);
				sqlite3_bind_null(del, (int)j + 2);
			}
		}
		if ((rc = sqlite3_step(sum)) == SQLITE_ROW) {
			*touched += sqlite3_column_int64(sum, 0);
			bytes += sqlite3_column_int64(sum, 1);
			rc = SQLITE_DONE;
		}
		sqlite3_reset(sum);
		if (rc != SQLITE_DONE || run(del) != SQLITE_DONE)
			return sq_abort_tx(s, q);
	}
	if (queue_sub(q, qid, *touched, bytes) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	return commit(s, q);
}

static int sq_remove_user(os_store *s, const os_key *k, int64_t *touched) {
	sq *q = s->impl;
	int64_t qid, count, bytes;
	*touched = 0;
	sq_cache_drop(&q->cache, k);
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	if (queue_get(q, k, &qid, &count, &bytes) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	if (qid == 0)
		return commit(s, q);
	if (run_qid(q, ST_USER_DEL_MSGS, qid) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	*touched = sqlite3_changes(q->db);
	if (run_qid(q, ST_QUEUE_DROP, qid) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	return commit(s, q);
}

static int sq_remove_host(os_store *s, os_str host, int64_t *touched) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	sq_cache_clear(&q->cache);
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	st = stmt(q, ST_HOST_DEL_MSGS);
	if (bind_text(st, 1, host) != SQLITE_OK || run(st) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	*touched = sqlite3_changes(q->db);
	st = stmt(q, ST_HOST_DEL_QUEUE);
	if (bind_text(st, 1, host) != SQLITE_OK || run(st) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	return commit(s, q);
}

/* Bulk deletes: fix every affected counter row from one grouped query,
 * delete the rows, then drop emptied counters; all in one transaction. */
static int bulk_delete(os_store *s, int sub, int del, int64_t arg, int64_t *touched) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	sq_cache_clear(&q->cache);
	if (begin(s, q) != OS_OK)
		return OS_FAIL;
	st = stmt(q, sub);
	sqlite3_bind_int64(st, 1, arg);
	if (run(st) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	st = stmt(q, del);
	sqlite3_bind_int64(st, 1, arg);
	if (run(st) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	*touched = sqlite3_changes(q->db);
	if (run(stmt(q, ST_QUEUE_DROP_EMPTY)) != SQLITE_DONE)
		return sq_abort_tx(s, q);
	return commit(s, q);
}

static int sq_delete_expired(os_store *s, int64_t now, int64_t *touched) {
	return bulk_delete(s, ST_EXPIRED_SUB, ST_EXPIRED_DEL, now, touched);
}

static int sq_delete_older_than(os_store *s, int64_t cutoff, int64_t *touched) {
	return bulk_delete(s, ST_OLDER_SUB, ST_OLDER_DEL, cutoff, touched);
}

static int sq_users(os_store *s, os_str host, os_emit_user emit, void *ud) {
	sq *q = s->impl;
	sqlite3_stmt *st;
	int rc;
	sq_recover(q);
	st = stmt(q, ST_USERS);
	if (bind_text(st, 1, host) != SQLITE_OK)
		return sqfail(s, q->db);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW)
		emit(ud, column_str(st, 0), sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2));
	sqlite3_reset(st);
	if (rc != SQLITE_DONE)
		return sqfail(s, q->db);
	return OS_OK;
}

static void sq_close(os_store *s) {
	sq *q = s->impl;
	if (q && q->db && !sqlite3_get_autocommit(q->db))
		sqlite3_exec(q->db, "ROLLBACK", NULL, NULL, NULL);
	sq_free(q);
	s->impl = NULL;
}

/* One BEGIN IMMEDIATE for many stores, one COMMIT (and one WAL sync) for all. */
static int sq_batch_begin(os_store *s) {
	return begin(s, s->impl);
}

static int sq_batch_end(os_store *s, int do_commit) {
	sq *q = s->impl;
	if (sqlite3_get_autocommit(q->db)) { /* the transaction is gone: sqlite rolled it back */
		forget_tx(q);
		return do_commit ? os_fail(s, SQLITE_ABORT, "the batch was rolled back") : OS_OK;
	}
	if (do_commit)
		return commit(s, q);
	sq_recover(q);
	if (!sqlite3_get_autocommit(q->db))
		return sqfail(s, q->db);
	return OS_OK;
}

/* The abandon step (backend.h): the write lock of the file goes at once. */
static void sq_abandon(os_store *s) {
	sq_recover(s->impl);
}

const os_backend sqlite_backend = {
	.name = "sqlite",
	.store = sq_store,
	.take = sq_take,
	.release = sq_release,
	.release_all = sq_release_all,
	.renew = sq_renew,
	.count = sq_count,
	.list = sq_list,
	.remove = sq_remove,
	.remove_user = sq_remove_user,
	.remove_host = sq_remove_host,
	.delete_expired = sq_delete_expired,
	.delete_older_than = sq_delete_older_than,
	.users = sq_users,
	.close = sq_close,
	.abandon = sq_abandon,
	.batch_begin = sq_batch_begin,
	.batch_end = sq_batch_end,
};
