/* SipHash-2-4 (Aumasson and Bernstein, "SipHash: a fast short-input PRF",
 * 2012), written from the paper's description, under a key drawn once per
 * process: the hash behind every table of the core (hash.h). An unkeyed hash
 * such as FNV-1a lets a sender pick thousands of names that fall in one
 * bucket and turn each lookup into a walk over all of them. */
#define _DEFAULT_SOURCE /* getrandom, getpid under -std=c99 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__) && defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 25)
#include <sys/random.h>
#define HAVE_GETRANDOM 1
#endif

#include "hash.h"

/* The process key. A mutable static, unlike the rest of the core, because
 * the key belongs to the process: written once, before the first hash (at
 * load), and never changed, since tables keep the hashes they computed. */
static unsigned char process_key[16];
static int keyed;

typedef struct {
	uint64_t v0, v1, v2, v3;
	uint64_t tail; /* the bytes of an unfinished word, little-endian */
	size_t n;      /* bytes taken in */
} sip;

static uint64_t rotl(uint64_t x, int b) {
	return (x << b) | (x >> (64 - b));
}

static uint64_t le64(const unsigned char *p) {
	return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
	       (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 |
	       (uint64_t)p[7] << 56;
}

static void sip_round(sip *s) {
	s->v0 += s->v1, s->v1 = rotl(s->v1, 13), s->v1 ^= s->v0, s->v0 = rotl(s->v0, 32);
	s->v2 += s->v3, s->v3 = rotl(s->v3, 16), s->v3 ^= s->v2;
	s->v0 += s->v3, s->v3 = rotl(s->v3, 21), s->v3 ^= s->v0;
	s->v2 += s->v1, s->v1 = rotl(s->v1, 17), s->v1 ^= s->v2, s->v2 = rotl(s->v2, 32);
}

/* One message word: two compression rounds. */
static void sip_word(sip *s, uint64_t m) {
	s->v3 ^= m;
	sip_round(s);
	sip_round(s);
	s->v0 ^= m;
}

static void sip_start(sip *s, const unsigned char key[16]) {
	uint64_t k0 = le64(key), k1 = le64(key + 8);
	s->v0 = k0 ^ 0x736f6d6570736575u; /* "somepseudorandomlygeneratedbytes" */
	s->v1 = k1 ^ 0x646f72616e646f6du;
	s->v2 = k0 ^ 0x6c7967656e657261u;
	s->v3 = k1 ^ 0x7465646279746573u;
	s->tail = 0, s->n = 0;
}

/* Takes in n more bytes: the message is the concatenation of every call's. */
static void sip_add(sip *s, const char *p, size_t n) {
	const unsigned char *b = (const unsigned char *)p;
	size_t i = 0, fill = s->n & 7;
	s->n += n;
	for (; fill != 0 && i < n; i++) { /* complete the unfinished word */
		s->tail |= (uint64_t)b[i] << (8 * fill);
		if (++fill == 8) {
			sip_word(s, s->tail);
			s->tail = 0, fill = 0;
		}
	}
	for (; n - i >= 8; i += 8)
		sip_word(s, le64(b + i));
	for (; i < n; i++, fill++)
		s->tail |= (uint64_t)b[i] << (8 * fill);
}

/* The last word carries the length's low byte; then four finalization rounds. */
static uint64_t sip_end(sip *s) {
	sip_word(s, s->tail | (uint64_t)(s->n & 0xff) << 56);
	s->v2 ^= 0xff;
	sip_round(s);
	sip_round(s);
	sip_round(s);
	sip_round(s);
	return s->v0 ^ s->v1 ^ s->v2 ^ s->v3;
}

uint64_t os_siphash(const unsigned char key[16], const char *a, size_t an, const char *b,
                    size_t bn) {
	sip s;
	sip_start(&s, key);
	sip_add(&s, a, an);
	if (b) {
		sip_add(&s, "\xff", 1);
		sip_add(&s, b, bn);
	}
	return sip_end(&s);
}

/* 16 bytes from the kernel; 0 when it has none to give. */
static int random_bytes(unsigned char *out, size_t n) {
	FILE *f;
	size_t got;
#ifdef HAVE_GETRANDOM
	/* GRND_NONBLOCK: early at boot, /dev/urandom answers where this would wait */
	if (getrandom(out, n, GRND_NONBLOCK) == (ssize_t)n)
		return 1;
#endif
	if (!(f = fopen("/dev/urandom", "rb")))
		return 0;
	got = fread(out, 1, n, f);
	fclose(f);
	return got == n;
}

void os_hash_init(void) {
	if (keyed)
		return;
	if (!random_bytes(process_key, sizeof process_key)) {
		/* No randomness to be had: still a key that differs per process and per
		 * run, from the clocks, the process id and where things were mapped
		 * (address space layout randomisation), mixed under a fixed key. */
		static const unsigned char fixed[16] = "offline-store-k";
		uint64_t v[6], k0, k1;
		struct timespec ts = {0, 0};
		clock_gettime(CLOCK_MONOTONIC, &ts);
		v[0] = (uint64_t)time(NULL), v[1] = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
		v[2] = (uint64_t)clock(), v[3] = (uint64_t)getpid();
		v[4] = (uint64_t)(uintptr_t)&ts, v[5] = (uint64_t)(uintptr_t)&os_hash_init;
		k0 = os_siphash(fixed, (const char *)v, sizeof v, NULL, 0);
		v[0] ^= k0;
		k1 = os_siphash(fixed, (const char *)v, sizeof v, NULL, 0);
		memcpy(process_key, &k0, 8);
		memcpy(process_key + 8, &k1, 8);
	}
	keyed = 1;
}

uint64_t os_hash(const char *p, size_t n) {
	if (!keyed)
		os_hash_init();
	return os_siphash(process_key, p, n, NULL, 0);
}

uint64_t os_hash_pair(const char *a, size_t an, const char *b, size_t bn) {
	char joined[128];
	if (!keyed)
		os_hash_init();
	if (an < sizeof joined && bn < sizeof joined - an) { /* (whole words go faster) */
		memcpy(joined, a, an);
		joined[an] = (char)0xff;
		memcpy(joined + an + 1, b, bn);
		return os_siphash(process_key, joined, an + 1 + bn, NULL, 0);
	}
	return os_siphash(process_key, a, an, b, bn);
}

int os_table_grow(os_table *t) {
	size_t n = t->nbucket ? t->nbucket * 2 : 64, i;
	os_link **b = calloc(n, sizeof *b);
	if (!b)
		return -1;
	for (i = 0; i < t->nbucket; i++) {
		os_link *e = t->bucket[i], *next;
		for (; e; e = next) {
			next = e->next;
			e->next = b[e->hash & (n - 1)];
			b[e->hash & (n - 1)] = e;
		}
	}
	free(t->bucket);
	t->bucket = b;
	t->nbucket = n;
	return 0;
}

void os_table_clear(os_table *t, void (*drop)(os_link *)) {
	size_t i;
	for (i = 0; t->n > 0 && i < t->nbucket; i++) {
		os_link *e = t->bucket[i], *next;
		t->bucket[i] = NULL;
		for (; e; e = next, t->n--) {
			next = e->next;
			if (drop)
				drop(e);
		}
	}
	t->n = 0;
}

void os_table_free(os_table *t, void (*drop)(os_link *)) {
	os_table_clear(t, drop);
	free(t->bucket);
	t->bucket = NULL;
	t->nbucket = 0;
}
