/* The core's one growable byte buffer: xml.c writes stanzas into it, the sqlite
 * backend keeps a batch's deferred rows in it, core.cache its keys. Plain C
 * memory, never the Lua heap. */
#ifndef OFFLINE_STORE_BUFFER_H
#define OFFLINE_STORE_BUFFER_H

#include "backend.h"

typedef struct {
	char *p;       /* NULL until the first byte (or os_buf_grow) */
	size_t n, cap; /* bytes used, bytes allocated */
	int oom;       /* sticks once an allocation failed, until os_buf_reset */
} os_buf;

/* Makes room for `more` bytes (and allocates the buffer if it has none yet, even
 * for 0, so that p is not NULL after it); 0, with oom set, when out of memory. */
OS_HIDDEN int os_buf_grow(os_buf *b, size_t more);

/* Appends n bytes; 0 when out of memory. Inline, so that short literals become a
 * few moves. */
static inline int os_buf_add(os_buf *b, const void *s, size_t n) {
	if ((!b->p || n > b->cap - b->n) && !os_buf_grow(b, n))
		return 0;
	if (n > 0)
		memcpy(b->p + b->n, s, n);
	b->n += n;
	return 1;
}

/* Empties the buffer and clears oom; the memory is kept unless it grew past
 * `keep` bytes (a big stanza, a chunk of big rows), which is given back. */
OS_HIDDEN void os_buf_reset(os_buf *b, size_t keep);

/* Gives the memory back; the buffer is then empty and usable again. */
OS_HIDDEN void os_buf_free(os_buf *b);

#endif
