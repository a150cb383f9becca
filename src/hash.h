/* The one hash function of the core's tables (the memory backend's queues, the
 * sqlite counter cache, core.cache): SipHash-2-4 under a key drawn at random
 * once per process, so that nobody outside can choose names that collide. */
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

#endif
