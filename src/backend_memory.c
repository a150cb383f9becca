/* The memory backend: a chained hash table of per-user FIFOs, in process,
 * lost on restart (the seed's mnesia-in-RAM role). Every queue keeps its
 * own count and bytes, so store() checks the limit in O(1). Empty queues
 * are freed, so memory follows what is stored. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "hash.h"

typedef struct mnode {
	struct mnode *next;
	int64_t id, ts, expire;
	size_t from_n, xml_n, meta_n;
	int has_meta;
	char data[]; /* from, xml, meta, back to back */
} mnode;

typedef struct mqueue {
	struct mqueue *hnext;
	uint64_t hash;
	int64_t count, bytes;
	mnode *head, *tail;
	size_t host_n, user_n;
	char key[]; /* host, user, back to back */
} mqueue;

typedef struct {
	mqueue **bucket;
	size_t nbucket, nqueue; /* nbucket is a power of two */
	int64_t last_id;
} mstore;

static int queue_is(const mqueue *q, uint64_t h, const os_key *k) {
	return q->hash == h && os_key_is(q->key, q->host_n, q->user_n, k);
}

/* Returns the slot pointing at the queue (or at the NULL ending its chain). */
static mqueue **find_slot(mstore *m, const os_key *k, uint64_t h) {
	mqueue **slot = &m->bucket[h & (m->nbucket - 1)];
	while (*slot && !queue_is(*slot, h, k))
		slot = &(*slot)->hnext;
	return slot;
}

static int grow(mstore *m) {
	size_t n = m->nbucket * 2, i;
	mqueue **b = calloc(n, sizeof *b);
	if (!b)
		return -1;
	for (i = 0; i < m->nbucket; i++) {
		mqueue *q = m->bucket[i], *next;
		for (; q; q = next) {
			next = q->hnext;
			q->hnext = b[q->hash & (n - 1)];
			b[q->hash & (n - 1)] = q;
		}
	}
	free(m->bucket);
	m->bucket = b;
	m->nbucket = n;
	return 0;
}

static void free_nodes(mnode *n) {
	while (n) {
		mnode *next = n->next;
		free(n);
		n = next;
	}
}

/* Unlinks and frees the queue at *slot. */
static void drop_queue(mstore *m, mqueue **slot) {
	mqueue *q = *slot;
	*slot = q->hnext;
	free_nodes(q->head);
	free(q);
	m->nqueue--;
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
}

static int is_expired(const mnode *n, int64_t now) {
	return n->expire != OS_NONE && n->expire <= now;
}

static int is_set_aside(const mnode *n) {
	os_str meta;
	meta.p = n->has_meta ? n->data + n->from_n + n->xml_n : NULL;
	meta.n = n->meta_n;
	return os_is_set_aside(meta);
}

static int mem_store(os_store *s, const os_key *k, const os_item *in, const os_limit *lim,
                     int64_t *count, int64_t *id) {
	mstore *m = s->impl;
	uint64_t h = os_key_hash(k);
	mqueue **slot = find_slot(m, k, h), *q = *slot;
	mnode *n;
	*count = q ? q->count : 0;
	if ((lim->max_count != OS_NONE && *count + 1 > lim->max_count) ||
	    (lim->max_bytes != OS_NONE && (q ? q->bytes : 0) + (int64_t)in->xml.n > lim->max_bytes))
		return OS_LIMIT;
	n = malloc(sizeof *n + in->from.n + in->xml.n + in->meta.n);
	if (!n)
		return os_fail(s, ENOMEM, "out of memory");
	if (!q) {
		q = malloc(sizeof *q + k->host.n + k->user.n);
		if (!q) {
			free(n);
			return os_fail(s, ENOMEM, "out of memory");
		}
		memset(q, 0, sizeof *q);
		q->hash = h;
		q->host_n = k->host.n;
		q->user_n = k->user.n;
		os_key_copy(q->key, k);
		*slot = q;
		m->nqueue++;
		if (m->nqueue > m->nbucket)
			grow(m); /* on failure the chains just get longer */
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

static int mem_pop(os_store *s, const os_key *k, int64_t now, int64_t max,
                   os_emit_item emit, void *ud, int64_t *expired) {
	mstore *m = s->impl;
	mqueue **slot = find_slot(m, k, os_key_hash(k)), *q = *slot;
	mnode *n, *end, *kept = NULL, **kept_next = &kept, *kept_last = NULL;
	int64_t returned = 0;
	*expired = 0;
	if (!q)
		return OS_OK;
	/* First emit, then unlink: if emit raises, the queue is untouched. */
	for (n = q->head; n && (max == OS_NONE || returned < max); n = n->next) {
		os_item it;
		if (is_set_aside(n) || is_expired(n, now))
			continue;
		to_item(n, &it);
		emit(ud, &it);
		returned++;
	}
	end = n;
	for (n = q->head; n != end;) {
		mnode *next = n->next;
		if (is_set_aside(n)) { /* stays, in order, ahead of the rows not reached */
			*kept_next = kept_last = n;
			kept_next = &n->next;
		} else {
			*expired += is_expired(n, now);
			q->count--;
			q->bytes -= (int64_t)n->xml_n;
			free(n);
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
	mqueue *q = *find_slot(m, k, os_key_hash(k));
	*count = q ? q->count : 0;
	*bytes = q ? q->bytes : 0;
	return OS_OK;
}

static int mem_list(os_store *s, const os_key *k, int64_t after_id, int64_t max,
                    os_emit_item emit, void *ud) {
	mstore *m = s->impl;
	mqueue *q = *find_slot(m, k, os_key_hash(k));
	mnode *n;
	int64_t i = 0;
	for (n = q ? q->head : NULL; n && (max == OS_NONE || i < max); n = n->next) {
		os_item it;
		if (n->id <= after_id)
			continue;
		to_item(n, &it);
		emit(ud, &it);
		i++;
	}
	return OS_OK;
}

/* Removes the nodes for which drop(node, arg) is true from one queue,
 * freeing the queue if it empties; returns how many went. */
static int64_t filter_queue(mstore *m, mqueue **slot, int (*drop)(const mnode *, const void *),
                            const void *arg) {
	mqueue *q = *slot;
	mnode **p = &q->head, *last = NULL;
	int64_t gone = 0;
	while (*p) {
		mnode *n = *p;
		if (drop(n, arg)) {
			*p = n->next;
			q->count--;
			q->bytes -= (int64_t)n->xml_n;
			free(n);
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
	mqueue **slot = find_slot(m, k, os_key_hash(k));
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
	mqueue **slot = find_slot(m, k, os_key_hash(k));
	*touched = *slot ? filter_queue(m, slot, drop_all, NULL) : 0;
	return OS_OK;
}

/* Applies filter_queue to every queue (of one host, when host.p is set). */
static int64_t filter_all(mstore *m, const os_str *host,
                          int (*drop)(const mnode *, const void *), const void *arg) {
	int64_t gone = 0;
	size_t i;
	for (i = 0; i < m->nbucket; i++) {
		mqueue **slot = &m->bucket[i];
		while (*slot) {
			mqueue *q = *slot;
			if (host && (q->host_n != host->n || memcmp(q->key, host->p, host->n) != 0)) {
				slot = &q->hnext;
				continue;
			}
			gone += filter_queue(m, slot, drop, arg);
			if (*slot == q) /* the queue survived */
				slot = &q->hnext;
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

static int mem_users(os_store *s, os_str host, os_emit_user emit, void *ud) {
	mstore *m = s->impl;
	size_t i;
	for (i = 0; i < m->nbucket; i++) {
		mqueue *q;
		for (q = m->bucket[i]; q; q = q->hnext) {
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
	for (i = 0; i < m->nbucket; i++)
		while (m->bucket[i])
			drop_queue(m, &m->bucket[i]);
	free(m->bucket);
	free(m);
	s->impl = NULL;
}

static const os_backend memory_backend = {
	"memory", mem_store, mem_pop, mem_count, mem_list, mem_remove, mem_remove_user,
	mem_remove_host, mem_delete_expired, mem_delete_older_than, mem_users, mem_close,
	NULL, NULL, /* no group commit */
};

int os_memory_open(os_store *s) {
	mstore *m = calloc(1, sizeof *m);
	if (m)
		m->bucket = calloc(m->nbucket = 64, sizeof *m->bucket);
	if (!m || !m->bucket) {
		free(m);
		return os_fail(s, ENOMEM, "out of memory");
	}
	s->impl = m;
	s->be = &memory_backend;
	return OS_OK;
}
