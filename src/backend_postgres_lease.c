/* The postgres backend's take (pop and lease, under the user's lock) and the
 * lease updates (release, release_all, renew), which take no queue lock; see
 * 3. and 6. in backend_postgres.c. */
#define _POSIX_C_SOURCE 200809L /* struct timespec in backend_postgres.h */

#include <stdlib.h>

#include "backend_postgres.h"

/* pop (owner.p NULL: deletes what it takes) and lease (marks it for owner
 * until `until`), as backend.h says, under the user's lock (see 3. and 6.). */
/* Rows a page may pass over beyond its max before it ends short (it then
 * returns fewer than max; the next call goes on from there). */
#define SCAN_SLACK 1024

int pg_take(os_store *s, const os_key *k, os_str owner, int64_t now, int64_t until,
                int64_t max, os_emit_item emit, void *ud, int64_t *expired, int64_t *held) {
	pg *g = s->impl;
	PGresult *r = NULL;
	params p;
	int64_t returned = 0, last = 0, xid, *ids = NULL;
	int rc = OS_OK, i, n, stopped = 0;
	*expired = 0;
	*held = OS_NONE;
	if (pg_recover(s, g) != OS_OK)
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
	if (pg_begin(s, g) != OS_OK) {
		rc = OS_FAIL;
		goto done;
	}
	r = run(g, ST_QUEUE_LOCK, &p);
	if (!result_ok(r))
		goto fail;
	if (PQntuples(r) == 0) { /* emptied meanwhile by another node */
		rc = pg_commit(s, g);
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
		pg_read_item(r, i, &it);
		if ((what = os_take_what(&it, owner, now)) == OS_TAKE_STOP) {
			stopped = 1;
			break;
		}
		if (what == OS_TAKE_SKIP)
			continue;
		last = it.id;
		if (what == OS_TAKE_EXPIRED) {
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
			pg_command(g, "ROLLBACK");
			rc = OS_FAIL;
			goto done;
		}
		for (j = 0; j < i; j++) {
			os_item it;
			pg_read_item(r, j, &it);
			if (os_take_what(&it, owner, now) == OS_TAKE_ROW)
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
		char *a;
		if ((rc = pg_ids_param(s, g, &p, ids, (size_t)returned, &a)) != OS_OK)
			goto done;
		p_bytes(&p, owner.p, owner.n);
		p_i64(&p, until);
		r = run(g, ST_LEASE_SET, &p);
		free(a);
		if (!result_ok(r))
			goto fail;
	}
	/* In doubt and the server cannot tell: the messages go out, since a
	 * message delivered twice is better than one lost. */
	rc = pg_commit_xid(s, g, xid, OS_OK);
	goto done;
fail:
	rc = pg_abort_tx(s, g, r);
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
	if (pg_recover(s, g) != OS_OK)
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

int pg_release(os_store *s, const os_key *k, os_str owner, int64_t *touched) {
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
	if (pg_recover(s, g) != OS_OK)
		return OS_FAIL;
	val[0] = prefix.p, len[0] = (int)prefix.n;
	r = PQexecParams(g->conn, "SELECT pg_try_advisory_lock(1330007123, hashtext(current_schema() || md5($1::bytea)))",
	                 1, NULL, val, len, fmt, 1);
	if (!result_ok(r) || PQntuples(r) != 1 || PQgetlength(r, 0, 0) != 1)
		rc = pgfail(s, g, r);
	else if (PQgetvalue(r, 0, 0)[0])
		rc = OS_OK;
	else
		rc = os_fail(s, pg_sqlstate_code("55P03"), "the leases of \"%.*s\" are held by another live process: "
		             "none released (SQLSTATE 55P03)", (int)(prefix.n > 80 ? 80 : prefix.n), prefix.p);
	PQclear(r);
	return rc;
}

int pg_release_all(os_store *s, const os_str *prefix, int64_t *touched) {
	params p;
	*touched = 0;
	if (prefix && prefix->n > 0 && hold_prefix(s, s->impl, *prefix) != OS_OK)
		return OS_FAIL;
	p.n = p.too_big = 0;
	p_bytes(&p, prefix ? prefix->p : "", prefix ? prefix->n : 0);
	return relet(s, ST_RELEASE_ALL, &p, touched);
}

int pg_renew(os_store *s, os_str prefix, int64_t until, int64_t *touched) {
	params p;
	p.n = p.too_big = 0;
	p_bytes(&p, prefix.p, prefix.n);
	p_i64(&p, until);
	return relet(s, ST_RENEW, &p, touched);
}