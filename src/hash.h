/* The core's one hash table and its hash function (the memory backend's queues
 * and dedup keys, the sqlite counter cache, core.cache): a chained table of
 * entries that embed their link, hashed by SipHash-2-4 under a key drawn at
 * random once per process, so that nobody outside can choose names that collide. */
#ifndef OFFLINE_STORE_HASH_H
#define OFFLINE_STORE_HASH_H

#include "backend.h"

/* Draws the process key if it is not drawn yet (the hash functions call it
 * too; luaopen calls it first, so that it is drawn at load). */
OS_HIDDEN void os_hash_init(void);

/* SipHash-2-4 of n bytes under the process key. */
OS_HIDDEN uint64_t os_hash(const char *p, size_t n);

/* The same over a, one byte 0xff (which no JID part holds), b. */
OS_HIDDEN uint64_t os_hash_pair(const char *a, size_t an, const char *b, size_t bn);

/* The hash of a key in the tables: host, 0xff, user. */
static inline uint64_t os_key_hash(const os_key *k) {
	return os_hash_pair(k->host.p, k->host.n, k->user.p, k->user.n);
}

/* SipHash-2-4 under a given 16-byte key (bytes 0-7 and 8-15 read
 * little-endian) of a alone (b == NULL) or of a, 0xff, b: what the two above
 * compute under the process key; for the specs. */
OS_HIDDEN uint64_t os_siphash(const unsigned char key[16], const char *a, size_t an, const char *b,
                              size_t bn);

/* A link embedded in each entry of a table (first member, or found back with
 * offsetof); the table owns no entry: its user allocates and frees them. */
typedef struct os_link {
	struct os_link *next;
	uint64_t hash;
} os_link;

typedef struct {
	os_link **bucket; /* NULL until the first os_table_grow */
	size_t nbucket;   /* 0, or a power of two */
	size_t n;         /* entries */
} os_table;

/* The slot pointing at the first entry of hash h that is(entry, arg) accepts,
 * or at the NULL ending its chain (where os_table_add would put it). The table
 * must have buckets. */
static inline os_link **os_table_slot(os_table *t, uint64_t h,
                                      int (*is)(const os_link *, const void *), const void *arg) {
	os_link **slot = &t->bucket[h & (t->nbucket - 1)];
	while (*slot && !((*slot)->hash == h && is(*slot, arg)))
		slot = &(*slot)->next;
	return slot;
}

/* The entry of hash h that `is` accepts, or NULL (also when the table has no buckets). */
static inline os_link *os_table_find(os_table *t, uint64_t h,
                                     int (*is)(const os_link *, const void *), const void *arg) {
	return t->bucket ? *os_table_slot(t, h, is, arg) : NULL;
}

/* The slot pointing at entry e, which is in the table. */
static inline os_link **os_table_slot_of(os_table *t, const os_link *e) {
	os_link **slot = &t->bucket[e->hash & (t->nbucket - 1)];
	while (*slot != e)
		slot = &(*slot)->next;
	return slot;
}

/* Puts an entry (its hash set) at the head of its chain. The table must have buckets. */
static inline void os_table_add(os_table *t, os_link *e) {
	os_link **head = &t->bucket[e->hash & (t->nbucket - 1)];
	e->next = *head;
	*head = e;
	t->n++;
}

/* Takes the entry at *slot out of the table (the caller frees it). */
static inline void os_table_unlink(os_table *t, os_link **slot) {
	*slot = (*slot)->next;
	t->n--;
}

/* Doubles the buckets (or makes the first 64); -1 when out of memory, the
 * table unchanged. */
OS_HIDDEN int os_table_grow(os_table *t);

/* Takes every entry out, calling drop(entry) on each (NULL: none), and keeps the
 * buckets. */
OS_HIDDEN void os_table_clear(os_table *t, void (*drop)(os_link *));

/* os_table_clear, then gives the buckets back. */
OS_HIDDEN void os_table_free(os_table *t, void (*drop)(os_link *));

#endif
