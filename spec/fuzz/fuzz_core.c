/* Differential fuzz target for the storage core: libFuzzer's input is decoded into a
 * sequence of backend calls that run on the memory backend, on the sqlite backend (one
 * ":memory:" database, emptied after each input) and on a plain reference model kept in arrays
 * here; the first disagreement or sanitizer report abort()s. Build and run: `make fuzz`. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "backend.h"

/*
 * Input encoding. Every read past the end yields 0 bytes, so any input decodes. Repeated:
 *   op = byte % 18, then its arguments:
 *   0-2 store  host user from xml ts expire max_count max_bytes meta dedup evict
 *          (evict: byte % 4 == 3; never in a batch with a fault, whose rollback the memory
 *          backend could not follow)
 *   3   pop    host user now max abort      4  count host user
 *   5   list   host user after max abort    6  remove host user n id*n
 *   7   remove_user host user   8 remove_host host   9 delete_expired now
 *   10  delete_older_than cutoff            11 users host abort
 *   12  batch  n where b, then 1 + n % 80 stores (as above) in one sqlite batch and its
 *          commit; a fault like op 13's, with b, in store number (where >> 3) % stores
 *          (one of the first 32) when where % 8 == 0, in the commit when where % 8 == 4; a
 *          store that fails ends the batch, and its remaining stores are not read (op_batch)
 *   13  fault  b: the next op's sqlite call sees allocation number 1 + (b >> 1) % 128 fail
 *          (b & 1: that one only; else every one after it, until the call returns)
 *   14  lease  host user owner now until max abort   15 release host user owner
 *   16  release_all prefix (or none)                 17 renew prefix until
 * Owners are a few names, some prefixes of others; a dedup key is none, one of a few, or
 * bytes of the input. remove is also confirm (the same backend call).
 * host and user index small fixed sets (so queues collide, including the pairs ("ab","c") and
 * ("a","bc") and names with NUL bytes); a user byte >= 0xc0 names one of 64 more users, so that
 * there can be more queues than the memory backend's initial 64 buckets. Times are mostly near
 * one base instant so that expire == now and ts == cutoff boundaries are hit; "abort" makes the
 * emit callback longjmp out after its k-th item, as a Lua error raised in core.c's collector
 * would. An id argument names an earlier stored message (mapped to each backend's own id) or
 * an id no message has. After the last op every queue the input named and every host's user
 * list are compared in full; then every host is removed from the sqlite store (emptying it for
 * the next input) and the memory store is closed with what it holds. Every op runs on sqlite
 * first: when an injected allocation failure makes it fail, the op is skipped on the memory
 * backend and in the model, so the comparisons that follow check it changed nothing (§3: "a
 * failure never leaves a half-written message or a wrong count"); inside a batch, the whole
 * batch is undone there (undo_batch), as sqlite must have rolled it back.
 * OFFLINE_STORE_FUZZ_TRACE=1 prints the ops as Lua calls (for turning a crash into a spec);
 * OFFLINE_STORE_FUZZ_DB=/tmp/file runs sqlite on that file (deleted at start) instead.
 */

#define MAX_OPS 2048
#define BASE INT64_C(1700000000000000) /* µs */
#define NB 2                           /* backends: 0 memory, 1 sqlite */

/* What core.c provides to the backends, with the same behaviour. */
int os_fail(os_store *s, int code, const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(s->errmsg, sizeof s->errmsg, fmt, ap);
	va_end(ap);
	s->errcode = code;
	return OS_FAIL;
}

#define S(lit) { lit, sizeof lit - 1 }
static const os_str HOSTS[] = { S("example.org"), S("ab"), S("a"), S(""), S("h\0st"), S("other.org") };
static const os_str NAMED[] = { S("bob"), S("c"), S("bc"), S(""), S("u\0ser"), S("\xff\xfe"), S("carol") };
static const os_str FROMS[] = { S("alice@example.org/phone"), S(""), S("x\0y") };
static const os_str OWNERS[] = { S("n1:1"), S("n1:2"), S("n2:1"), S("n1"), S(""), S("n1:1\0") };
static const os_str KEYS[] = { S("alice\0o1"), S("alice\0o2"), S("bob\0o1"), S("") };
#define NOWNER (int)(sizeof OWNERS / sizeof *OWNERS)
#define NH (int)(sizeof HOSTS / sizeof *HOSTS)
#define NNAMED (int)(sizeof NAMED / sizeof *NAMED)
#define NU (NNAMED + 64) /* the named users, then "u0".."u63": enough queues to grow tables */
static os_str USERS[NU];
static char user_names[64][4];
static unsigned char used[NH][NU]; /* keys this input named */

/* ---- input reader ---- */

typedef struct {
	const uint8_t *p;
	size_t n;
} reader;

static unsigned u8(reader *r) {
	if (!r->n)
		return 0;
	r->n--;
	return *r->p++;
}

static uint64_t un(reader *r, int nbytes) {
	uint64_t v = 0;
	int i;
	for (i = 0; i < nbytes; i++)
		v |= (uint64_t)u8(r) << (8 * i);
	return v;
}

static int pick_host(reader *r) {
	return (int)(u8(r) % NH);
}

/* Mostly the named users, so that queues collide. */
static int pick_user(reader *r, int h) {
	unsigned b = u8(r);
	int u = b < 0xc0 ? (int)(b % NNAMED) : NNAMED + (int)(b & 63);
	used[h][u] = 1;
	return u;
}

static os_str take(reader *r, size_t n) {
	os_str s;
	if (n > r->n)
		n = r->n;
	s.p = n ? (const char *)r->p : "";
	s.n = n;
	r->p += n;
	r->n -= n;
	return s;
}

static int64_t pick_time(reader *r) {
	static const int64_t extreme[8] = { INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1,
	                                    0, -1, 1, BASE };
	unsigned b = u8(r);
	uint64_t raw;
	int64_t v;
	switch (b >> 5) {
	case 0: case 1: case 2: case 3:
		return BASE + (int64_t)(b & 31) - 16;
	case 4:
		return BASE + (int64_t)u8(r) - 128;
	case 5:
		return BASE + (int64_t)un(r, 2) * 1000 - 32768000;
	case 6:
		return extreme[b & 7];
	default:
		raw = un(r, 8);
		memcpy(&v, &raw, sizeof v);
		return v;
	}
}

static int64_t pick_expire(reader *r) {
	return u8(r) & 1 ? pick_time(r) : OS_NONE;
}

/* A limit as core.c lets it through: OS_NONE or >= 0; mostly none. */
static int64_t pick_limit(reader *r, int64_t scale) {
	static const int64_t extreme[4] = { 0, 1, INT64_MAX, INT64_MAX - 1 };
	unsigned b = u8(r);
	switch (b & 7) {
	case 4: return (b >> 3) & 7;
	case 5: return (int64_t)(b >> 3) * scale;
	case 6: return (int64_t)un(r, 2) % (64 * scale);
	case 7: return extreme[(b >> 3) & 3];
	default: return OS_NONE;
	}
}

static os_str pick_payload(reader *r) {
	unsigned b = u8(r);
	size_t n = b < 0xe0 ? b % 48 : (size_t)(b & 31) * 64 + u8(r) % 64;
	return take(r, n);
}

static os_str pick_from(reader *r) {
	unsigned b = u8(r) % 4;
	return b < 3 ? FROMS[b] : take(r, u8(r) % 16);
}

static os_str pick_meta(reader *r) {
	os_str m;
	switch (u8(r) % 4) {
	case 2: /* empty, or the marker of a row set aside (backend.h), which pop skips */
		m.p = u8(r) & 1 ? OS_SET_ASIDE : "";
		m.n = strlen(m.p);
		return m;
	case 3: return take(r, u8(r) % 16);
	default: m.p = NULL; m.n = 0; return m;
	}
}

static os_str pick_dedup(reader *r) {
	os_str d;
	unsigned b = u8(r);
	switch (b % 4) {
	case 2: return KEYS[(b >> 2) % 4];
	case 3: return take(r, u8(r) % 8);
	default: d.p = NULL; d.n = 0; return d;
	}
}

/* An owner's index in OWNERS, or (prefix) -1 for "none" when allowed. */
static int pick_owner(reader *r, int none) {
	unsigned b = u8(r);
	return none && b >= 0xe0 ? -1 : (int)(b % NOWNER);
}

/* Pop/list max: OS_NONE or a small count (core.c allows >= 0). */
static int64_t pick_max(reader *r) {
	unsigned b = u8(r);
	return b & 1 ? OS_NONE : (int64_t)(b >> 1) % 8;
}

/* 0: let the call finish; k: raise out of the k-th emit. */
static size_t pick_abort(reader *r) {
	unsigned b = u8(r);
	return b >= 0xf0 ? (size_t)(b & 15) + 1 : 0;
}

/* ---- the reference model ---- */

typedef struct {
	int host, user, alive;
	int64_t ts, expire;
	os_str from, xml, meta, dedup; /* bytes live in the fuzzer's input (dedup.p NULL: none) */
	int64_t id[NB];                /* the id each backend gave it */
	int owner;                     /* leased to OWNERS[owner - 1]; 0: free */
	int64_t lease_until;
} mmsg;

static mmsg msgs[MAX_OPS]; /* in store order, so in id order for every backend */
static size_t nmsg;
static int64_t last_id[NB]; /* the highest id each backend has handed out */

static int of_key(const mmsg *m, int h, int u) {
	return m->alive && m->host == h && m->user == u;
}

static void model_count(int h, int u, int64_t *count, int64_t *bytes) {
	size_t i;
	*count = *bytes = 0;
	for (i = 0; i < nmsg; i++)
		if (of_key(&msgs[i], h, u)) {
			++*count;
			*bytes += (int64_t)msgs[i].xml.n;
		}
}

static int is_expired(const mmsg *m, int64_t now) {
	return m->expire != OS_NONE && m->expire <= now;
}

/* Whether the user's queue holds a row with key d. */
static int model_dup(int h, int u, os_str d) {
	size_t i;
	for (i = 0; d.p && i < nmsg; i++)
		if (of_key(&msgs[i], h, u) && msgs[i].dedup.p && msgs[i].dedup.n == d.n &&
		    (d.n == 0 || memcmp(msgs[i].dedup.p, d.p, d.n) == 0))
			return 1;
	return 0;
}

static int has_prefix(os_str s, os_str prefix) {
	return s.n >= prefix.n && (prefix.n == 0 || memcmp(s.p, prefix.p, prefix.n) == 0);
}

/* ---- the run ---- */

static os_store stores[NB];
static const char *const bname[NB] = { "memory", "sqlite" };
static int opno, trace;
static const char *opname;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3), noreturn))
#endif
static void fail(int b, const char *fmt, ...);

static void fail(int b, const char *fmt, ...) {
	va_list ap;
	fprintf(stderr, "\nfuzz_core MISMATCH: op %d (%s), backend %s: ", opno, opname,
	        b >= 0 ? bname[b] : "-");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	abort();
}

/* ---- allocation faults for sqlite (SQLITE_CONFIG_MALLOC, installed before the first open) ---- */

static sqlite3_mem_methods real_mem, fault_mem;
static struct {
	long pending, countdown; /* pending: set by op 13 for the next op; countdown > 0: armed */
	int once, pending_once, hit;
} flt;

static int fault_now(void) {
	if (flt.countdown > 0 && --flt.countdown == 0) {
		flt.hit = 1;
		flt.countdown = flt.once ? 0 : 1; /* stays at 1: every later allocation fails too */
		return 1;
	}
	return 0;
}

static void *fault_malloc(int n) {
	return fault_now() ? NULL : real_mem.xMalloc(n);
}

static void *fault_realloc(void *p, int n) {
	return fault_now() ? NULL : real_mem.xRealloc(p, n);
}

static void install_faults(void) {
	if (sqlite3_config(SQLITE_CONFIG_GETMALLOC, &real_mem) != SQLITE_OK)
		abort();
	fault_mem = real_mem;
	fault_mem.xMalloc = fault_malloc;
	fault_mem.xRealloc = fault_realloc;
	if (sqlite3_config(SQLITE_CONFIG_MALLOC, &fault_mem) != SQLITE_OK)
		abort();
}

/* Arms the pending fault around backend b's call (only sqlite's). */
static void fault_arm(int b) {
	flt.hit = 0;
	flt.countdown = b == 1 ? flt.pending : 0;
	flt.once = flt.pending_once;
}

/* Disarms; 1 when the call failed under an injected fault: the caller then skips the op. */
static int fault_failed(int b, int rc) {
	int failed = b == 1 && flt.hit && rc == OS_FAIL;
	flt.countdown = 0;
	if (b == 1)
		flt.pending = 0;
	if (failed && trace)
		fprintf(stderr, "-- sqlite failed under the injected fault: %s (%d); op skipped\n",
		        stores[1].errmsg, stores[1].errcode);
	return failed;
}

/* Sets a fault from byte b for sqlite's next call (op 13, or a batch's store or
 * commit): allocation number 1 + (b >> 1) % 128 fails, that one only if b & 1. */
static void fault_set(unsigned b, const char *where) {
	flt.pending = 1 + (long)(b >> 1) % 128;
	flt.pending_once = b & 1;
	if (trace)
		fprintf(stderr, "-- fault: %s fails at allocation %ld%s\n", where, flt.pending,
		        flt.pending_once ? " (once)" : " (and after)");
}

static void check_rc(int b, int rc, int want) {
	if (rc == OS_FAIL)
		fail(b, "call failed: %s (%d)", stores[b].errmsg, stores[b].errcode);
	if (rc != want)
		fail(b, "returned %d, the model says %d", rc, want);
}

static void check_i64(int b, const char *what, int64_t got, int64_t want) {
	if (got != want)
		fail(b, "%s is %lld, the model says %lld", what, (long long)got, (long long)want);
}

static int str_eq(os_str a, os_str b) {
	return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0);
}

static os_key key_of(int h, int u) {
	os_key k;
	k.host = HOSTS[h];
	k.user = USERS[u];
	return k;
}

/* Tracing as Lua source, so a crash reads like the regression spec it becomes. */
static void tr_str(os_str s) {
	size_t i;
	if (!s.p) {
		fputs("nil", stderr);
		return;
	}
	fputc('"', stderr);
	for (i = 0; i < s.n; i++) {
		unsigned char c = (unsigned char)s.p[i];
		if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\')
			fputc(c, stderr);
		else
			fprintf(stderr, "\\%03u", c);
	}
	fputc('"', stderr);
}

static void tr_int(int64_t v) {
	if (v == INT64_MIN)
		fputs("math.mininteger", stderr);
	else
		fprintf(stderr, "%lld", (long long)v);
}

static void tr_opt(int64_t v) {
	if (v == OS_NONE)
		fputs("nil", stderr);
	else
		tr_int(v);
}

static void tr_key(const char *method, int h, int u) {
	fprintf(stderr, "db:%s(", method);
	tr_str(HOSTS[h]);
	if (u >= 0) {
		fputs(", ", stderr);
		tr_str(USERS[u]);
	}
}

/* The emit callbacks check each item against the model as it comes. */
static struct {
	int b, leases;      /* leases: items carry their lease (list); else they come free */
	const size_t *want; /* model indexes, in the order the items must come */
	size_t nwant, seen, abort_at;
	int64_t ucount[NU], ubytes[NU];
	int useen[NU];
	jmp_buf jb;
} cx;

static void on_item(void *ud, const os_item *it) {
	const mmsg *m;
	(void)ud;
	if (cx.seen >= cx.nwant)
		fail(cx.b, "emitted more than the %zu items expected (extra id %lld)", cx.nwant,
		     (long long)it->id);
	m = &msgs[cx.want[cx.seen]];
	if (it->id != m->id[cx.b])
		fail(cx.b, "item %zu has id %lld, expected message #%zu (id %lld)", cx.seen,
		     (long long)it->id, cx.want[cx.seen], (long long)m->id[cx.b]);
	check_i64(cx.b, "item ts", it->ts, m->ts);
	check_i64(cx.b, "item expire", it->expire, m->expire);
	if (!str_eq(it->from, m->from))
		fail(cx.b, "item %zu: from differs", cx.seen);
	if (!str_eq(it->xml, m->xml))
		fail(cx.b, "item %zu: xml differs (%zu bytes, expected %zu)", cx.seen, it->xml.n, m->xml.n);
	if ((it->meta.p == NULL) != (m->meta.p == NULL) || (m->meta.p && !str_eq(it->meta, m->meta)))
		fail(cx.b, "item %zu: meta differs", cx.seen);
	if (cx.leases && m->owner) {
		if (!it->lease_owner.p || !str_eq(it->lease_owner, OWNERS[m->owner - 1]))
			fail(cx.b, "item %zu: not leased to owner %d", cx.seen, m->owner - 1);
		check_i64(cx.b, "item lease_until", it->lease_until, m->lease_until);
	} else if (it->lease_owner.p) {
		fail(cx.b, "item %zu: leased, the model says free", cx.seen);
	}
	if (++cx.seen == cx.abort_at)
		longjmp(cx.jb, 1);
}

static void on_user(void *ud, os_str user, int64_t count, int64_t bytes) {
	int u;
	(void)ud;
	for (u = 0; u < NU && !str_eq(user, USERS[u]); u++)
		;
	if (u == NU)
		fail(cx.b, "users() emitted a user no message was stored for");
	if (cx.useen[u]++)
		fail(cx.b, "users() emitted user %d twice", u);
	if (cx.ucount[u] == 0)
		fail(cx.b, "users() emitted user %d, whose queue is empty", u);
	check_i64(cx.b, "users() count", count, cx.ucount[u]);
	check_i64(cx.b, "users() bytes", bytes, cx.ubytes[u]);
	if (++cx.seen == cx.abort_at)
		longjmp(cx.jb, 1);
}

static size_t want_buf[MAX_OPS];

/* Eviction as backend.h says: the oldest rows of the user's queue that have no lease
 * owner, in id order, until the new message of xml_n bytes fits; their indexes into
 * out, and how many; -1 when they do not make room. */
static long model_evict(int h, int u, const os_limit *lim, size_t xml_n, size_t *out) {
	int64_t count, bytes;
	size_t i;
	long n = 0;
	model_count(h, u, &count, &bytes);
	if (os_never_fits(lim, xml_n))
		return -1;
	for (i = 0; i < nmsg && os_over_limit(lim, count, bytes, xml_n); i++) {
		if (!of_key(&msgs[i], h, u) || msgs[i].owner)
			continue;
		count--;
		bytes -= (int64_t)msgs[i].xml.n;
		out[n++] = i;
	}
	return os_over_limit(lim, count, bytes, xml_n) ? -1 : n;
}

static size_t evict_buf[MAX_OPS];

/* 1 when sqlite's store failed under an injected fault (then nothing else ran).
 * may_evict: 0 in a batch that a fault may roll back. */
static int op_store(reader *r, int may_evict) {
	int h = pick_host(r), u = pick_user(r, h), b;
	mmsg m;
	os_key k = key_of(h, u);
	os_item it;
	os_limit lim;
	int64_t count, bytes;
	long nevict = 0, e;
	int want;
	memset(&m, 0, sizeof m);
	m.host = h;
	m.user = u;
	m.from = pick_from(r);
	m.xml = pick_payload(r);
	m.ts = pick_time(r);
	m.expire = pick_expire(r);
	lim.max_count = pick_limit(r, 1);
	lim.max_bytes = pick_limit(r, 16);
	m.meta = pick_meta(r);
	m.dedup = pick_dedup(r);
	lim.evict_oldest = (u8(r) % 4 == 3) && may_evict;
	model_count(h, u, &count, &bytes);
	want = model_dup(h, u, m.dedup) ? OS_DUP
	       : (lim.max_count != OS_NONE && count + 1 > lim.max_count) ||
	                 (lim.max_bytes != OS_NONE && bytes + (int64_t)m.xml.n > lim.max_bytes)
	           ? OS_LIMIT
	           : OS_OK;
	if (want == OS_LIMIT && lim.evict_oldest &&
	    (nevict = model_evict(h, u, &lim, m.xml.n, evict_buf)) >= 0)
		want = OS_OK;
	if (nevict < 0)
		nevict = 0;
	if (trace) {
		tr_key("store", h, u);
		fputs(", ", stderr), tr_str(m.from), fputs(", ", stderr), tr_str(m.xml);
		fputs(", ", stderr), tr_int(m.ts), fputs(", ", stderr), tr_opt(m.expire);
		fputs(", ", stderr), tr_opt(lim.max_count), fputs(", ", stderr), tr_opt(lim.max_bytes);
		fputs(", ", stderr), tr_str(m.meta), fputs(", ", stderr), tr_str(m.dedup);
		if (lim.evict_oldest)
			fputs(", true", stderr);
		if (want == OS_OK)
			fprintf(stderr, ") -- ids[%zu], %ld evicted\n", nmsg, nevict);
		else
			fputs(want == OS_DUP ? ") -- duplicate\n" : ") -- limit\n", stderr);
	}
	memset(&it, 0, sizeof it);
	it.dedup = m.dedup;
	it.id = 0;
	it.ts = m.ts;
	it.expire = m.expire;
	it.from = m.from;
	it.xml = m.xml;
	it.meta = m.meta;
	for (b = NB - 1; b >= 0; b--) {
		int64_t got_count = -1, id = 0, evicted = -1;
		int rc;
		fault_arm(b);
		rc = stores[b].be->store(&stores[b], &k, &it, &lim, &got_count, &id, &evicted);
		if (fault_failed(b, rc))
			return 1;
		check_rc(b, rc, want);
		check_i64(b, "store count", got_count, want == OS_OK ? count + 1 - nevict : count);
		check_i64(b, "store evicted", evicted, want == OS_OK ? nevict : 0);
		if (want == OS_OK) {
			if (id <= last_id[b])
				fail(b, "id %lld is not above the previous id %lld", (long long)id,
				     (long long)last_id[b]);
			last_id[b] = m.id[b] = id;
		}
	}
	if (want == OS_OK) {
		for (e = 0; e < nevict; e++)
			msgs[evict_buf[e]].alive = 0;
		m.alive = 1;
		msgs[nmsg++] = m;
	}
	return 0;
}

/* Undoes the stores of a batch that sqlite rolled back (messages first..nmsg-1): on
 * the memory backend, which has no batches, by removing them; in the model, by
 * forgetting them, so that no later op names them. The ids sqlite handed out in the
 * batch were never committed, and its next ids may reuse them: an id of a message that
 * never was means nothing (and "after" it would differ between the backends). */
static void undo_batch(size_t first, int64_t last_id_before) {
	size_t i;
	for (i = first; i < nmsg; i++) {
		os_key k = key_of(msgs[i].host, msgs[i].user);
		int64_t touched = 0;
		if (!msgs[i].alive)
			continue;
		if (stores[0].be->remove(&stores[0], &k, &msgs[i].id[0], 1, &touched) != OS_OK || touched != 1)
			fail(0, "undoing a rolled-back batch's store failed: %s", stores[0].errmsg);
	}
	nmsg = first;
	last_id[1] = last_id_before;
}

/* A group-commit batch on sqlite: up to 80 stores, each checked against the model
 * as it is made (the counts and the limit include the batch's own stores, which
 * sqlite writes 256 rows or 1 MB at a time), then the commit. One byte may place an
 * injected allocation fault in one of the stores or in the commit (the next byte
 * says which allocation): a store or commit that fails under it must have rolled
 * the whole batch back, counters included, which the model and the memory backend
 * then follow (undo_batch) and every later op checks. */
static void op_batch(reader *r) {
	size_t n = 1 + u8(r) % 80, i, first = nmsg;
	unsigned where = u8(r), which = u8(r);
	/* where % 8: 0, a fault in store number (where >> 3) % n; 4, in the commit (number n) */
	size_t fault_at = where % 8 == 0 ? (size_t)(where >> 3) % n : where % 8 == 4 ? n : SIZE_MAX;
	long pending = flt.pending; /* an op 13 fault for the op after the batch */
	int pending_once = flt.pending_once;
	int64_t last_id_before = last_id[1];
	int rc, failed;
	flt.pending = 0;
	if (trace)
		fputs("assert(db:begin())\n", stderr);
	if (stores[1].be->batch_begin(&stores[1]) != OS_OK)
		fail(1, "batch_begin failed: %s", stores[1].errmsg);
	stores[1].in_batch = 1;
	for (i = 0; i < n && nmsg < MAX_OPS && r->n > 0; i++) {
		if (i == fault_at)
			fault_set(which, "the batch's next store");
		failed = op_store(r, fault_at == SIZE_MAX);
		flt.pending = 0;
		if (failed != !stores[1].in_batch)
			fail(1, failed ? "a store failed in a batch and left the batch open"
			               : "the batch ended without a failed store");
		if (failed) { /* the whole batch is gone */
			if (trace)
				fputs("-- the batch was rolled back\n", stderr);
			undo_batch(first, last_id_before);
			flt.pending = pending, flt.pending_once = pending_once;
			return;
		}
	}
	stores[1].in_batch = 0;
	if (trace)
		fputs("assert(db:commit())\n", stderr);
	if (fault_at == n)
		fault_set(which, "the commit");
	fault_arm(1);
	rc = stores[1].be->batch_end(&stores[1], 1);
	if (fault_failed(1, rc)) {
		if (trace)
			fputs("-- the commit failed: the batch was rolled back\n", stderr);
		undo_batch(first, last_id_before);
	} else if (rc != OS_OK)
		fail(1, "commit failed: %s", stores[1].errmsg);
	flt.pending = pending, flt.pending_once = pending_once;
}

/* A lease of m that lives at now and is not owner's (owner 0: anybody's). */
static int model_held(const mmsg *m, int owner, int64_t now) {
	return m->owner && m->lease_until > now && m->owner != owner;
}

/* pop (owner 0) and lease (owner: 1 + its index in OWNERS), as backend.h says: the model
 * walks the user's messages in id order, then both backends must emit what it took and
 * change what it changed (set aside: skipped; expired: deleted; under another's live lease:
 * the walk stops; the owner's own live lease: skipped; else taken). */
static void do_take(reader *r, int owner) {
	int h = pick_host(r), u = pick_user(r, h), b;
	int64_t now = pick_time(r), until = owner ? pick_time(r) : 0, max = pick_max(r);
	int64_t expired = 0, returned = 0, expired_want = 0, held_want = OS_NONE;
	size_t abort_at = pick_abort(r), i, nvisit = 0, visit[MAX_OPS];
	os_key k = key_of(h, u);
	int jumped_want, stopped = 0;
	if (trace) {
		tr_key(owner ? "lease" : "pop", h, u);
		if (owner)
			fputs(", ", stderr), tr_str(OWNERS[owner - 1]);
		fputs(", ", stderr), tr_int(now);
		if (owner)
			fputs(", ", stderr), tr_int(until);
		fputs(", ", stderr), tr_opt(max);
		fprintf(stderr, ")%s\n", abort_at ? " -- abandoned" : "");
	}
	cx.nwant = 0;
	for (i = 0; i < nmsg && (max == OS_NONE || returned < max); i++) {
		const mmsg *m = &msgs[i];
		if (!of_key(m, h, u) || os_is_set_aside(m->meta))
			continue;
		if (is_expired(m, now)) {
			visit[nvisit++] = i;
			expired_want++;
			continue;
		}
		if (owner && m->owner == owner && m->lease_until > now)
			continue;
		if (model_held(m, owner, now)) {
			stopped = 1;
			break;
		}
		visit[nvisit++] = i;
		want_buf[cx.nwant++] = i;
		returned++;
	}
	if (stopped && returned == 0)
		for (; i < nmsg; i++)
			if (of_key(&msgs[i], h, u) && model_held(&msgs[i], owner, now) &&
			    !is_expired(&msgs[i], now) && (held_want == OS_NONE || msgs[i].lease_until > held_want))
				held_want = msgs[i].lease_until;
	jumped_want = abort_at && abort_at <= cx.nwant;
	for (b = NB - 1; b >= 0; b--) {
		volatile int rc = OS_FAIL;
		int64_t held = -1;
		cx.b = b;
		cx.leases = 0;
		cx.want = want_buf;
		cx.seen = 0;
		cx.abort_at = abort_at;
		fault_arm(b);
		if (setjmp(cx.jb) == 0) {
			os_str who = { NULL, 0 };
			if (owner)
				who = OWNERS[owner - 1];
			rc = stores[b].be->take(&stores[b], &k, who, now, owner ? until : 0, max, on_item, NULL,
			                        &expired, &held);
			if (fault_failed(b, rc))
				return;
			if (jumped_want)
				fail(b, "%s finished instead of being abandoned at item %zu", opname, abort_at);
			check_rc(b, rc, OS_OK);
			check_i64(b, "items", (int64_t)cx.seen, (int64_t)cx.nwant);
			if (!owner)
				check_i64(b, "pop expired", expired, expired_want);
			check_i64(b, "held until", held, held_want);
		} else {
			fault_failed(b, OS_OK);
			if (!jumped_want)
				fail(b, "%s jumped out unexpectedly", opname);
		}
	}
	if (!jumped_want)
		for (i = 0; i < nvisit; i++) {
			mmsg *m = &msgs[visit[i]];
			if (owner && !is_expired(m, now)) {
				m->owner = owner;
				m->lease_until = until;
			} else {
				m->alive = 0;
			}
		}
}

/* release (one user, one owner; all: prefix or every lease, every user) and renew. */
static void do_relet(reader *r, int kind) {
	int h = kind == 'r' ? pick_host(r) : 0, u = kind == 'r' ? pick_user(r, h) : 0;
	int owner = pick_owner(r, kind == 'a'), b;
	int64_t until = kind == 'n' ? pick_time(r) : 0, want = 0;
	os_str who = owner >= 0 ? OWNERS[owner] : OWNERS[0];
	os_key k = key_of(h, u);
	size_t i;
	if (trace) {
		if (kind == 'r')
			tr_key("release", h, u), fputs(", ", stderr), tr_str(who);
		else
			fputs(kind == 'a' ? "db:release_all(" : "db:renew(", stderr), tr_str(owner >= 0 ? who : OWNERS[0]);
		if (kind == 'n')
			fputs(", ", stderr), tr_int(until);
		fputs(owner < 0 ? ") -- (no prefix: every lease)\n" : ")\n", stderr);
	}
	for (i = 0; i < nmsg; i++) {
		const mmsg *m = &msgs[i];
		if (!m->alive || !m->owner)
			continue;
		if (kind == 'r' ? of_key(m, h, u) && m->owner == owner + 1
		                : owner < 0 || has_prefix(OWNERS[m->owner - 1], who))
			want++;
	}
	for (b = NB - 1; b >= 0; b--) {
		int64_t touched = -1;
		os_store *s = &stores[b];
		int rc;
		fault_arm(b);
		if (kind == 'r')
			rc = s->be->release(s, &k, who, &touched);
		else if (kind == 'a')
			rc = s->be->release_all(s, owner >= 0 ? &who : NULL, &touched);
		else
			rc = s->be->renew(s, who, until, &touched);
		if (fault_failed(b, rc))
			return;
		check_rc(b, rc, OS_OK);
		check_i64(b, "leases touched", touched, want);
	}
	for (i = 0; i < nmsg; i++) {
		mmsg *m = &msgs[i];
		if (!m->alive || !m->owner)
			continue;
		if (kind == 'r' ? of_key(m, h, u) && m->owner == owner + 1
		                : owner < 0 || has_prefix(OWNERS[m->owner - 1], who)) {
			if (kind == 'n')
				m->lease_until = until;
			else
				m->owner = 0;
		}
	}
}

static void do_count(int h, int u) {
	int64_t want_count, want_bytes;
	os_key k = key_of(h, u);
	int b;
	model_count(h, u, &want_count, &want_bytes);
	for (b = NB - 1; b >= 0; b--) {
		int64_t count = -1, bytes = -1;
		int rc;
		fault_arm(b);
		rc = stores[b].be->count(&stores[b], &k, &count, &bytes);
		if (fault_failed(b, rc))
			return;
		check_rc(b, rc, OS_OK);
		check_i64(b, "count", count, want_count);
		check_i64(b, "bytes", bytes, want_bytes);
	}
}

static void op_count(reader *r) {
	int h = pick_host(r), u = pick_user(r, h);
	if (trace)
		tr_key("count", h, u), fputs(")\n", stderr);
	do_count(h, u);
}

/* after: the index of the message whose id to page after; >= nmsg: after every id
 * (math.maxinteger); -1 or -2: before every id (0 or math.mininteger). */
static void do_list(int h, int u, long after, int64_t max, size_t abort_at) {
	static const int64_t none_after[2] = { INT64_MIN, 0 };
	os_key k = key_of(h, u);
	size_t i;
	int b, jumped_want;
	cx.nwant = 0;
	for (i = after < 0 ? 0 : (size_t)after + 1; i < nmsg; i++)
		if (of_key(&msgs[i], h, u) && (max == OS_NONE || (int64_t)cx.nwant < max))
			want_buf[cx.nwant++] = i;
	jumped_want = abort_at && abort_at <= cx.nwant;
	for (b = NB - 1; b >= 0; b--) {
		int64_t after_id;
		volatile int rc = OS_FAIL;
		if (after < 0)
			after_id = none_after[after & 1];
		else if ((size_t)after >= nmsg)
			after_id = INT64_MAX;
		else
			after_id = msgs[after].id[b];
		cx.b = b;
		cx.leases = 1;
		cx.want = want_buf;
		cx.seen = 0;
		cx.abort_at = abort_at;
		fault_arm(b);
		if (setjmp(cx.jb) == 0) {
			rc = stores[b].be->list(&stores[b], &k, after_id, max, on_item, NULL);
			if (fault_failed(b, rc))
				return;
			if (jumped_want)
				fail(b, "list finished instead of being abandoned at item %zu", abort_at);
			check_rc(b, rc, OS_OK);
			check_i64(b, "list items", (int64_t)cx.seen, (int64_t)cx.nwant);
		} else {
			fault_failed(b, OS_OK);
			if (!jumped_want)
				fail(b, "list jumped out unexpectedly");
		}
	}
}

static void op_list(reader *r) {
	int h = pick_host(r), u = pick_user(r, h);
	unsigned sel = u8(r);
	long after;
	int64_t max;
	size_t abort_at;
	if (sel < 0xc0 && nmsg)
		after = (long)(un(r, 2) % nmsg);
	else
		after = sel & 4 ? (long)nmsg : -1 - (long)(sel & 1);
	max = pick_max(r);
	abort_at = pick_abort(r);
	if (trace) {
		tr_key("list", h, u);
		if (after >= 0 && (size_t)after < nmsg)
			fprintf(stderr, ", ids[%ld]", after);
		else
			fprintf(stderr, after < 0 ? ", %s" : ", math.maxinteger",
			        after == -1 ? "0" : "math.mininteger");
		fputs(", ", stderr), tr_opt(max), fprintf(stderr, ")%s\n", abort_at ? " -- abandoned" : "");
	}
	do_list(h, u, after, max, abort_at);
}

static void op_remove(reader *r) {
	static const int64_t unknown[5] = { 0, -1, INT64_MIN, INT64_MAX, INT64_MAX - 1 };
	int h = pick_host(r), u = pick_user(r, h), b;
	size_t n = u8(r) % 6, i, j;
	long which[8]; /* a message index, or -1 - an index into unknown[] */
	int64_t ids[NB][8], touched_want = 0;
	os_key k = key_of(h, u);
	for (i = 0; i < n; i++) {
		unsigned sel = u8(r);
		which[i] = sel < 0xd0 && nmsg ? (long)(un(r, 2) % nmsg) : -1 - (long)(sel % 5);
		for (b = 0; b < NB; b++)
			ids[b][i] = which[i] >= 0 ? msgs[which[i]].id[b] : unknown[-1 - which[i]];
	}
	if (trace) {
		tr_key("remove", h, u), fputs(", {", stderr);
		for (i = 0; i < n; i++) {
			if (which[i] >= 0)
				fprintf(stderr, "%sids[%ld]", i ? ", " : "", which[i]);
			else
				fputs(i ? ", " : "", stderr), tr_int(ids[0][i]);
		}
		fputs("})\n", stderr);
	}
	for (i = 0; i < n; i++) {
		int dup = 0;
		for (j = 0; j < i; j++)
			dup |= which[j] == which[i];
		if (!dup && which[i] >= 0 && of_key(&msgs[which[i]], h, u))
			touched_want++;
	}
	for (b = NB - 1; b >= 0; b--) {
		int64_t touched = -1;
		int rc;
		fault_arm(b);
		rc = stores[b].be->remove(&stores[b], &k, ids[b], n, &touched);
		if (fault_failed(b, rc))
			return;
		check_rc(b, rc, OS_OK);
		check_i64(b, "remove touched", touched, touched_want);
	}
	for (i = 0; i < n; i++)
		if (which[i] >= 0 && of_key(&msgs[which[i]], h, u))
			msgs[which[i]].alive = 0;
}

/* The shared tail of the four bulk deletes: h/u < 0 match every host/user. */
static int64_t model_delete(int h, int u, int kind, int64_t arg, int apply) {
	int64_t n = 0;
	size_t i;
	for (i = 0; i < nmsg; i++) {
		mmsg *m = &msgs[i];
		if (!m->alive || (h >= 0 && m->host != h) || (u >= 0 && m->user != u))
			continue;
		if ((kind == 'e' && !is_expired(m, arg)) || (kind == 'o' && !(m->ts < arg)))
			continue;
		if (apply)
			m->alive = 0;
		n++;
	}
	return n;
}

/* Runs one bulk delete on backend `only`, or on every backend when only < 0. */
static void do_bulk(int kind, int h, int u, int64_t arg, int only) {
	int64_t want = model_delete(h, u, kind, arg, 0);
	os_key k = key_of(h < 0 ? 0 : h, u < 0 ? 0 : u);
	int b;
	for (b = NB - 1; b >= 0; b--) {
		int64_t touched = -1;
		os_store *s = &stores[b];
		int rc;
		if (only >= 0 && b != only)
			continue;
		fault_arm(b);
		switch (kind) {
		case 'u': rc = s->be->remove_user(s, &k, &touched); break;
		case 'h': rc = s->be->remove_host(s, HOSTS[h], &touched); break;
		case 'e': rc = s->be->delete_expired(s, arg, &touched); break;
		default: rc = s->be->delete_older_than(s, arg, &touched); break;
		}
		if (fault_failed(b, rc))
			return;
		check_rc(b, rc, OS_OK);
		check_i64(b, "touched", touched, want);
	}
	model_delete(h, u, kind, arg, 1);
}

static void op_bulk(reader *r, int kind) {
	int h = -1, u = -1;
	int64_t arg = 0;
	switch (kind) {
	case 'u': h = pick_host(r); u = pick_user(r, h); break;
	case 'h': h = pick_host(r); break;
	default: arg = pick_time(r); break;
	}
	if (trace) {
		if (kind == 'u' || kind == 'h')
			tr_key(kind == 'u' ? "remove_user" : "remove_host", h, u), fputs(")\n", stderr);
		else
			fputs(kind == 'e' ? "db:delete_expired(" : "db:delete_older_than(", stderr),
				tr_int(arg), fputs(")\n", stderr);
	}
	do_bulk(kind, h, u, arg, -1);
}

static void do_users(int h, size_t abort_at) {
	int b, u, nusers = 0, jumped_want;
	for (u = 0; u < NU; u++) {
		model_count(h, u, &cx.ucount[u], &cx.ubytes[u]);
		nusers += cx.ucount[u] > 0;
	}
	jumped_want = abort_at && abort_at <= (size_t)nusers;
	for (b = NB - 1; b >= 0; b--) {
		volatile int rc = OS_FAIL;
		cx.b = b;
		cx.seen = 0;
		cx.abort_at = abort_at;
		memset(cx.useen, 0, sizeof cx.useen);
		fault_arm(b);
		if (setjmp(cx.jb) == 0) {
			rc = stores[b].be->users(&stores[b], HOSTS[h], on_user, NULL);
			if (fault_failed(b, rc))
				return;
			if (jumped_want)
				fail(b, "users finished instead of being abandoned at user %zu", abort_at);
			check_rc(b, rc, OS_OK);
			check_i64(b, "users emitted", (int64_t)cx.seen, nusers);
		} else {
			fault_failed(b, OS_OK);
			if (!jumped_want)
				fail(b, "users jumped out unexpectedly");
		}
	}
}

static void op_users(reader *r) {
	int h = pick_host(r);
	size_t abort_at = pick_abort(r);
	if (trace)
		tr_key("users", h, -1), fprintf(stderr, ")%s\n", abort_at ? " -- abandoned" : "");
	do_users(h, abort_at);
}

/* Every queue this input named and every host's users, in full, on both backends. */
static void final_sweep(void) {
	int h, u;
	opname = "final sweep";
	for (h = 0; h < NH; h++) {
		for (u = 0; u < NU; u++) {
			if (!used[h][u])
				continue;
			do_count(h, u);
			do_list(h, u, -1, OS_NONE, 0);
		}
		do_users(h, 0);
	}
}

/* The sqlite store is opened once per process (opening costs ~1 ms: schema and statements)
 * and emptied after every input; the memory store is opened fresh for every input. */
static void open_stores(void) {
	const char *path = getenv("OFFLINE_STORE_FUZZ_DB");
	os_sqlite_config cfg;
	char aux[4096];
	memset(&stores[0], 0, sizeof stores[0]);
	if (os_memory_open(&stores[0]) != OS_OK)
		fail(0, "open: %s", stores[0].errmsg);
	if (stores[1].be)
		return;
	install_faults();
	if (path && *path && strlen(path) < sizeof aux - 8) {
		remove(path);
		snprintf(aux, sizeof aux, "%s-wal", path);
		remove(aux);
		snprintf(aux, sizeof aux, "%s-shm", path);
		remove(aux);
	} else {
		path = ":memory:";
	}
	cfg.path = path;
	cfg.synchronous_full = 0;
	cfg.busy_timeout_ms = 0;
	if (os_sqlite_open(&stores[1], &cfg) != OS_OK)
		fail(1, "open: %s", stores[1].errmsg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
	reader r;
	int h;
	r.p = data;
	r.n = size;
	trace = getenv("OFFLINE_STORE_FUZZ_TRACE") != NULL;
	if (!USERS[0].p) {
		for (h = 0; h < NNAMED; h++)
			USERS[h] = NAMED[h];
		for (h = 0; h < 64; h++) {
			USERS[NNAMED + h].p = user_names[h];
			USERS[NNAMED + h].n = (size_t)sprintf(user_names[h], "u%d", h);
		}
	}
	memset(used, 0, sizeof used);
	nmsg = 0;
	memset(last_id, 0, sizeof last_id);
	opno = 0;
	opname = "open";
	open_stores();
	while (r.n > 0 && opno < MAX_OPS) {
		unsigned op = u8(&r) % 18;
		opno++;
		switch (op) {
		case 0: case 1: case 2: opname = "store"; op_store(&r, 1); break;
		case 3: opname = "pop"; do_take(&r, 0); break;
		case 4: opname = "count"; op_count(&r); break;
		case 5: opname = "list"; op_list(&r); break;
		case 6: opname = "remove"; op_remove(&r); break;
		case 7: opname = "remove_user"; op_bulk(&r, 'u'); break;
		case 8: opname = "remove_host"; op_bulk(&r, 'h'); break;
		case 9: opname = "delete_expired"; op_bulk(&r, 'e'); break;
		case 10: opname = "delete_older_than"; op_bulk(&r, 'o'); break;
		case 11: opname = "users"; op_users(&r); break;
		case 12: opname = "batch"; op_batch(&r); break;
		case 14: opname = "lease"; do_take(&r, 1 + pick_owner(&r, 0)); break;
		case 15: opname = "release"; do_relet(&r, 'r'); break;
		case 16: opname = "release_all"; do_relet(&r, 'a'); break;
		case 17: opname = "renew"; do_relet(&r, 'n'); break;
		default:
			opname = "fault";
			fault_set(u8(&r), "the next sqlite call");
			break;
		}
	}
	flt.pending = 0;
	final_sweep();
	/* Empties the sqlite store through the API (every message lives on one of HOSTS); the
	 * memory store is closed as it is, so that closing frees queues that still hold messages. */
	opname = "emptying";
	for (h = 0; h < NH; h++)
		do_bulk('h', h, -1, 0, 1);
	stores[0].be->close(&stores[0]);
	return 0;
}
