/* The memory backend: a hash table (hash.h) of per-user FIFOs, in process,
 * lost on restart (the seed's mnesia-in-RAM role). Every queue keeps its
 * own count and bytes, so store() checks the limit in O(1). Empty queues
 * are freed, so memory follows what is stored. Rows with a dedup key are also
 * in a second hash table, by (queue, key), so the duplicate check is O(1) too.
 * The rows one lease call marks share one reference-counted owner. */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "hash.h"

typedef struct mowner {
	size_t refs, n;
	char p[];
} mowner;

struct mqueue;

typedef struct mnode {
	struct mnode *next;
	int64_t id, ts, expire;
	size_t from_n, xml_n, meta_n, dedup_n;
	int has_meta, has_dedup;
	mowner *owner; /* NULL: free */
	int64_t lease_until;
	os_link dlink;           /* in the dedup table (has_dedup only) */
	const struct mqueue *dq; /* and the queue it belongs to */
	char data[]; /* from, xml, meta, dedup, back to back */
} mnode;

typedef struct mqueue {
	os_link link; /* in the queue table (first: a link is its queue) */
	int64_t count, bytes;
	mnode *head, *tail;
	size_t host_n, user_n;
	char key[]; /* host, user, back to back */
} mqueue;

typedef struct {
	os_table queues; /* by (host, user) */
	os_table dedup;  /* rows with a dedup key, by (queue, key) */
	int64_t last_id;
} mstore;

#define QUEUE(link) ((mqueue *)(link))

static int queue_is(const os_link *l, const void *k) {
	const mqueue *q = (const mqueue *)l;
	return os_key_is(q->key, q->host_n, q->user_n, k);
}

/* Returns the slot pointing at the queue (or at the NULL ending its chain). */
static os_link **find_slot(mstore *m, const os_key *k, uint64_t h) {
	return os_table_slot(&m->queues, h, queue_is, k);
}

static const char *dedup_of(const mnode *n) {
	return n->data + n->from_n + n->xml_n + n->meta_n;
}

static uint64_t dedup_hash(const mqueue *q, os_str d) {
	return os_hash_pair(q->key, q->host_n + q->user_n, d.p, d.n);
}

static const mnode *dedup_node(const os_link *l) {
	return (const mnode *)(const void *)((const char *)l - offsetof(mnode, dlink));
}

typedef struct {
	const mqueue *q;
	os_str d;
} dedup_key;

static int dedup_is(const os_link *l, const void *arg) {
	const mnode *n = dedup_node(l);
	const dedup_key *dk = arg;
	return n->dq == dk->q && n->dedup_n == dk->d.n && memcmp(dedup_of(n), dk->d.p, dk->d.n) == 0;
}

/* Whether q holds a row with key d. */
static int dedup_held(mstore *m, const mqueue *q, os_str d) {
	dedup_key dk;
	dk.q = q, dk.d = d;
	return os_table_find(&m->dedup, dedup_hash(q, d), dedup_is, &dk) != NULL;
}

static void owner_unref(mowner *o) {
	if (o && --o->refs == 0)
		free(o);
}

/* Frees a row, taking it out of the dedup table and dropping its lease. */
static void free_node(mstore *m, mnode *n) {
	if (n->has_dedup)
		os_table_unlink(&m->dedup, os_table_slot_of(&m->dedup, &n->dlink));
	owner_unref(n->owner);
	free(n);
}

static void free_nodes(mstore *m, mnode *n) {
	while (n) {
		mnode *next = n->next;
		free_node(m, n);
		n = next;
	}
}

/* Unlinks and frees the queue at *slot. */
static void drop_queue(mstore *m, os_link **slot) {
	mqueue *q = QUEUE(*slot);
	os_table_unlink(&m->queues, slot);
	free_nodes(m, q->head);
	free(q);
}

static void to_item(const mnode *n, os_item *it) {
	it->id = n->id;
	it->ts = n->ts;
	it->expire = n->expire;
	it->from.p = n->data;
	it->from.n = n->from_n;
	it->xml.p = n->data + n->from_n;
	it->xml.n = n->xml_n;
	it->meta.p = n->has_meta ? n->data + n->from_n + n->xml_n : NULL;
	it->meta.n = n->meta_n;
	it->dedup.p = it->lease_owner.p = NULL;
	it->dedup.n = it->lease_owner.n = 0;
	it->lease_until = 0;
}

static int is_expired(const mnode *n, int64_t now) {
	return os_is_expired(n->expire, now);
}

/* Whether evicting q's oldest unleased rows makes room for xml_n more bytes
 * (backend.h's walk); if so, evicts them and says how many in *evicted. Reads
 * the rows it evicts and the leased ones it passes over, no further. */
static int evict_oldest(mstore *m, mqueue *q, const os_limit *lim, size_t xml_n,
                        int64_t *evicted) {
	int64_t count = q->count, bytes = q->bytes, n = 0;
	mnode *it, **link, *end, *kept;
	for (it = q->head; it && os_over_limit(lim, count, bytes, xml_n); it = it->next)
		n += os_evict_row(&count, &bytes, (int64_t)it->xml_n, it->owner != NULL);
	if (os_over_limit(lim, count, bytes, xml_n))
		return 0;
	/* unlink the unleased rows before `end`, the first row the walk left */
	for (end = it, link = &q->head, kept = NULL; *link != end;) {
		mnode *row = *link;
		if (row->owner) {
			kept = row;
			link = &row->next;
			continue;
		}
		*link = row->next;
		free_node(m, row);
	}
	if (!end)
		q->tail = kept;
	q->count = count, q->bytes = bytes;
	*evicted = n;
	return 1;
}

static int mem_store(os_store *s, const os_key *k, const os_item *in, const os_limit *lim,
                     int64_t *count, int64_t *id, int64_t *evicted) {
	mstore *m = s->impl;
	uint64_t h = os_key_hash(k);
	os_link **slot = find_slot(m, k, h);
	mqueue *q = QUEUE(*slot);
	mnode *n;
	size_t dedup_n = in->dedup.p ? in->dedup.n : 0;
	*count = q ? q->count : 0;
	*evicted = 0;
	if (q && in->dedup.p && dedup_held(m, q, in->dedup))
		return OS_DUP;
	if (os_over_limit(lim, *count, q ? q->bytes : 0, in->xml.n) &&
	    (!lim->evict_oldest || !q || os_never_fits(lim, in->xml.n)))
		return OS_LIMIT;
	if (in->dedup.p && m->dedup.n >= m->dedup.nbucket && os_table_grow(&m->dedup) != 0)
		return os_fail(s, ENOMEM, "out of memory");
	n = malloc(sizeof *n + in->from.n + in->xml.n + in->meta.n + dedup_n);
	if (!n)
		return os_fail(s, ENOMEM, "out of memory");
	/* (after the last allocation that can fail: an eviction is never undone) */
	if (q && os_over_limit(lim, q->count, q->bytes, in->xml.n) &&
	    !evict_oldest(m, q, lim, in->xml.n, evicted)) {
		free(n);
		return OS_LIMIT;
	}
	if (!q) {
		q = malloc(sizeof *q + k->host.n + k->user.n);
		if (!q) {
			free(n);
			return os_fail(s, ENOMEM, "out of memory");
		}
		memset(q, 0, sizeof *q);
		q->link.hash = h;
		q->host_n = k->host.n;
		q->user_n = k->user.n;
		os_key_copy(q->key, k);
		os_table_add(&m->queues, &q->link);
		if (m->queues.n > m->queues.nbucket)
			os_table_grow(&m->queues); /* on failure the chains just get longer */
	}
	n->next = NULL;
	n->id = ++m->last_id;
	n->ts = in->ts;
	n->expire = in->expire;
	n->from_n = in->from.n;
	n->xml_n = in->xml.n;
	n->meta_n = in->meta.p ? in->meta.n : 0;
	n->has_meta = in->meta.p != NULL;
	memcpy(n->data, in->from.p, in->from.n);
	memcpy(n->data + n->from_n, in->xml.p, in->xml.n);
	if (n->has_meta)
		memcpy(n->data + n->from_n + n->xml_n, in->meta.p, n->meta_n);
	n->owner = NULL;
	n->lease_until = 0;
	n->has_dedup = in->dedup.p != NULL;
	n->dedup_n = dedup_n;
	if (n->has_dedup) {
		memcpy(n->data + n->from_n + n->xml_n + n->meta_n, in->dedup.p, dedup_n);
		n->dq = q;
		n->dlink.hash = dedup_hash(q, in->dedup);
		os_table_add(&m->dedup, &n->dlink);
	}
	if (q->tail)
		q->tail->next = n;
	else
		q->head = n;
	q->tail = n;
	q->count++;
	q->bytes += (int64_t)in->xml.n;
	*count = q->count;
	*id = n->id;
	return OS_OK;
}

static int is_owner(const mnode *n, os_str owner) {
	return n->owner && n->owner->n == owner.n && memcmp(n->owner->p, owner.p, owner.n) == 0;
}

/* A lease that lives at now and is not owner's (owner.p NULL: anybody's). */
static int held_by_other(const mnode *n, os_str owner, int64_t now) {
	return n->owner && n->lease_until > now && !(owner.p && is_owner(n, owner));
}

/* What take does with row n (os_take_what); it as to_item makes it (no lease). */
static int node_what(const mnode *n, os_str who, int64_t now, os_item *it) {
	int what;
	to_item(n, it);
	if (n->owner) {
		it->lease_owner.p = n->owner->p, it->lease_owner.n = n->owner->n;
		it->lease_until = n->lease_until;
	}
	what = os_take_what(it, who, now);
	it->lease_owner.p = NULL, it->lease_owner.n = 0, it->lease_until = 0;
	return what;
}

/* pop (who.p == NULL: deletes what it takes) and lease (marks it for who), as
 * backend.h says. */
static int mem_take(os_store *s, const os_key *k, os_str who, int64_t now, int64_t until,
                int64_t max, os_emit_item emit, void *ud, int64_t *expired, int64_t *held) {
	mstore *m = s->impl;
	os_link **slot = find_slot(m, k, os_key_hash(k));
	mqueue *q = QUEUE(*slot);
	mnode *n, *end, *kept = NULL, **kept_next = &kept, *kept_last = NULL;
	mowner *shared = NULL;
	int owner = who.p != NULL, stopped = 0;
	int64_t returned = 0;
	*expired = 0;
	*held = OS_NONE;
	if (!q)
		return OS_OK;
	/* First emit, then change the queue: if emit raises, the queue is untouched
	 * (backend.h's cleanup rule; nothing to recover at the next call). */
	for (n = q->head; n && (max == OS_NONE || returned < max); n = n->next) {
		os_item it;
		int what = node_what(n, who, now, &it);
		if (what == OS_TAKE_SKIP || what == OS_TAKE_EXPIRED)
			continue;
		if (what == OS_TAKE_STOP) {
			stopped = 1;
			break;
		}
		emit(ud, &it);
		returned++;
	}
	end = n;
	if (returned == 0 && stopped) {
		for (n = end; n; n = n->next)
			if (held_by_other(n, who, now) && !is_expired(n, now) &&
			    (*held == OS_NONE || n->lease_until > *held))
				*held = n->lease_until;
	}
	if (owner && returned > 0) {
		if (!(shared = malloc(sizeof *shared + who.n)))
			return os_fail(s, ENOMEM, "out of memory");
		shared->refs = 0;
		shared->n = who.n;
		memcpy(shared->p, who.p, who.n);
	}
	for (n = q->head; n != end;) {
		mnode *next = n->next;
		os_item it;
		int what = node_what(n, who, now, &it);
		if (what == OS_TAKE_EXPIRED) {
			(*expired)++;
			q->count--;
			q->bytes -= (int64_t)n->xml_n;
			free_node(m, n);
		} else {
			if (owner && what == OS_TAKE_ROW) { /* taken: leased */
				owner_unref(n->owner);
				n->owner = shared;
				shared->refs++;
				n->lease_until = until;
			}
			if (!owner && what == OS_TAKE_ROW) { /* taken: deleted */
				q->count--;
				q->bytes -= (int64_t)n->xml_n;
				free_node(m, n);
			} else { /* stays, in order, ahead of the rows not reached */
				*kept_next = kept_last = n;
				kept_next = &n->next;
			}
		}
		n = next;
	}
	*kept_next = end;
	q->head = kept;
	if (!end)
		q->tail = kept_last;
	if (!q->head)
		drop_queue(m, slot);
	return OS_OK;
}

static int mem_count(os_store *s, const os_key *k, int64_t *count, int64_t *bytes) {
	mstore *m = s->impl;
	mqueue *q = QUEUE(*find_slot(m, k, os_key_hash(k)));
	*count = q ? q->count : 0;
	*bytes = q ? q->bytes : 0;
	return OS_OK;
}

static int mem_list(os_store *s, const os_key *k, int64_t after_id, int64_t max,
                    os_emit_item emit, void *ud) {
	mstore *m = s->impl;
	mqueue *q = QUEUE(*find_slot(m, k, os_key_hash(k)));
	mnode *n;
	int64_t i = 0;
	for (n = q ? q->head : NULL; n && (max == OS_NONE || i < max); n = n->next) {
		os_item it;
		if (n->id <= after_id)
			continue;
		to_item(n, &it);
		if (n->owner) {
			it.lease_owner.p = n->owner->p;
			it.lease_owner.n = n->owner->n;
			it.lease_until = n->lease_until;
		}
		emit(ud, &it);
		i++;
	}
	return OS_OK;
}

/* Removes the nodes for which drop(node, arg) is true from one queue,
 * freeing the queue if it empties; returns how many went. */
static int64_t filter_queue(mstore *m, os_link **slot, int (*drop)(const mnode *, const void *),
                            const void *arg) {
	mqueue *q = QUEUE(*slot);
	mnode **p = &q->head, *last = NULL;
	int64_t gone = 0;
	while (*p) {
		mnode *n = *p;
		if (drop(n, arg)) {
			*p = n->next;
			q->count--;
			q->bytes -= (int64_t)n->xml_n;
			free_node(m, n);
			gone++;
		} else {
			last = n;
			p = &n->next;
		}
	}
	q->tail = last;
	if (!q->head)
		drop_queue(m, slot);
	return gone;
}

typedef struct { int64_t *ids; size_t n; } id_set; /* ids sorted */

static int cmp_id(const void *a, const void *b) {
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

static int drop_listed(const mnode *n, const void *arg) {
	const id_set *set = arg;
	return bsearch(&n->id, set->ids, set->n, sizeof *set->ids, cmp_id) != NULL;
}

static int drop_all(const mnode *n, const void *arg) {
	(void)n, (void)arg;
	return 1;
}

static int drop_expired(const mnode *n, const void *arg) {
	return is_expired(n, *(const int64_t *)arg);
}

static int drop_older(const mnode *n, const void *arg) {
	return n->ts < *(const int64_t *)arg;
}

static int mem_remove(os_store *s, const os_key *k, const int64_t *ids, size_t n,
                      int64_t *touched) {
	mstore *m = s->impl;
	os_link **slot = find_slot(m, k, os_key_hash(k));
	id_set set;
	*touched = 0;
	if (!*slot || n == 0)
		return OS_OK;
	/* A sorted copy, so each queued message is looked up in O(log n). */
	set.ids = malloc(n * sizeof *set.ids);
	if (!set.ids)
		return os_fail(s, ENOMEM, "out of memory");
	memcpy(set.ids, ids, n * sizeof *set.ids);
	qsort(set.ids, n, sizeof *set.ids, cmp_id);
	set.n = n;
	*touched = filter_queue(m, slot, drop_listed, &set);
	free(set.ids);
	return OS_OK;
}

static int mem_remove_user(os_store *s, const os_key *k, int64_t *touched) {
	mstore *m = s->impl;
	os_link **slot = find_slot(m, k, os_key_hash(k));
	*touched = *slot ? filter_queue(m, slot, drop_all, NULL) : 0;
	return OS_OK;
}

/* Applies filter_queue to every queue (of one host, when host.p is set). */
static int64_t filter_all(mstore *m, const os_str *host,
                          int (*drop)(const mnode *, const void *), const void *arg) {
	int64_t gone = 0;
	size_t i;
	for (i = 0; i < m->queues.nbucket; i++) {
		os_link **slot = &m->queues.bucket[i];
		while (*slot) {
			mqueue *q = QUEUE(*slot);
			if (host && (q->host_n != host->n || memcmp(q->key, host->p, host->n) != 0)) {
				slot = &q->link.next;
				continue;
			}
			gone += filter_queue(m, slot, drop, arg);
			if (*slot == &q->link) /* the queue survived */
				slot = &q->link.next;
		}
	}
	return gone;
}

static int mem_remove_host(os_store *s, os_str host, int64_t *touched) {
	*touched = filter_all(s->impl, &host, drop_all, NULL);
	return OS_OK;
}

static int mem_delete_expired(os_store *s, int64_t now, int64_t *touched) {
	*touched = filter_all(s->impl, NULL, drop_expired, &now);
	return OS_OK;
}

static int mem_delete_older_than(os_store *s, int64_t cutoff, int64_t *touched) {
	*touched = filter_all(s->impl, NULL, drop_older, &cutoff);
	return OS_OK;
}

/* Calls f(node, arg) on every row (of one queue when q is set); returns how many
 * rows it changed. */
static int64_t each_row(mstore *m, mqueue *q, int (*f)(mnode *, const void *), const void *arg) {
	int64_t changed = 0;
	size_t i;
	for (i = 0; i < m->queues.nbucket; i++) {
		mqueue *p;
		for (p = q ? q : QUEUE(m->queues.bucket[i]); p; p = q ? NULL : QUEUE(p->link.next)) {
			mnode *n;
			for (n = p->head; n; n = n->next)
				changed += f(n, arg);
		}
		if (q)
			break;
	}
	return changed;
}

typedef struct {
	os_str owner; /* p NULL: every lease */
	int prefix;   /* owner is a prefix */
	int64_t until; /* renew's */
} lease_match;

static int lease_matches(const mnode *n, const lease_match *lm) {
	if (!n->owner)
		return 0;
	if (!lm->owner.p)
		return 1;
	if (lm->prefix)
		return n->owner->n >= lm->owner.n && memcmp(n->owner->p, lm->owner.p, lm->owner.n) == 0;
	return is_owner(n, lm->owner);
}

static int unlease(mnode *n, const void *arg) {
	if (!lease_matches(n, arg))
		return 0;
	owner_unref(n->owner);
	n->owner = NULL;
	n->lease_until = 0;
	return 1;
}

static int relet(mnode *n, const void *arg) {
	const lease_match *lm = arg;
	if (!lease_matches(n, lm))
		return 0;
	n->lease_until = lm->until;
	return 1;
}

static int mem_release(os_store *s, const os_key *k, os_str owner, int64_t *touched) {
	mstore *m = s->impl;
	mqueue *q = QUEUE(*find_slot(m, k, os_key_hash(k)));
	lease_match lm;
	lm.owner = owner, lm.prefix = 0, lm.until = 0;
	*touched = q ? each_row(m, q, unlease, &lm) : 0;
	return OS_OK;
}

static int mem_release_all(os_store *s, const os_str *prefix, int64_t *touched) {
	lease_match lm;
	lm.owner.p = prefix ? (prefix->p ? prefix->p : "") : NULL;
	lm.owner.n = prefix ? prefix->n : 0;
	lm.prefix = 1, lm.until = 0;
	*touched = each_row(s->impl, NULL, unlease, &lm);
	return OS_OK;
}

static int mem_renew(os_store *s, os_str prefix, int64_t until, int64_t *touched) {
	lease_match lm;
	lm.owner.p = prefix.p ? prefix.p : "";
	lm.owner.n = prefix.n;
	lm.prefix = 1, lm.until = until;
	*touched = each_row(s->impl, NULL, relet, &lm);
	return OS_OK;
}

static int mem_users(os_store *s, os_str host, os_emit_user emit, void *ud) {
	mstore *m = s->impl;
	size_t i;
	for (i = 0; i < m->queues.nbucket; i++) {
		mqueue *q;
		for (q = QUEUE(m->queues.bucket[i]); q; q = QUEUE(q->link.next)) {
			os_str user;
			if (q->host_n != host.n || memcmp(q->key, host.p, host.n) != 0)
				continue;
			user.p = q->key + q->host_n;
			user.n = q->user_n;
			emit(ud, user, q->count, q->bytes);
		}
	}
	return OS_OK;
}

static void mem_close(os_store *s) {
	mstore *m = s->impl;
	size_t i;
	if (!m)
		return;
	for (i = 0; i < m->queues.nbucket; i++)
		while (m->queues.bucket[i])
			drop_queue(m, &m->queues.bucket[i]);
	os_table_free(&m->queues, NULL);
	os_table_free(&m->dedup, NULL);
	free(m);
	s->impl = NULL;
}

static const os_backend memory_backend = {
	.name = "memory",
	.store = mem_store,
	.take = mem_take,
	.release = mem_release,
	.release_all = mem_release_all,
	.renew = mem_renew,
	.count = mem_count,
	.list = mem_list,
	.remove = mem_remove,
	.remove_user = mem_remove_user,
	.remove_host = mem_remove_host,
	.delete_expired = mem_delete_expired,
	.delete_older_than = mem_delete_older_than,
	.users = mem_users,
	.close = mem_close,
	/* no group commit: .batch_begin and .batch_end stay NULL */
};

int os_memory_open(os_store *s) {
	mstore *m = calloc(1, sizeof *m);
	if (!m || os_table_grow(&m->queues) != 0) {
		free(m);
		return os_fail(s, ENOMEM, "out of memory");
	}
	s->impl = m;
	s->be = &memory_backend;
	return OS_OK;
}
