/* The growable byte buffer of buffer.h: doubles from 512 bytes. */
#include <stdlib.h>

#include "buffer.h"

int os_buf_grow(os_buf *b, size_t more) {
	size_t cap = b->cap ? b->cap : 512;
	char *np;
	if (b->oom)
		return 0;
	while (cap - b->n < more)
		cap *= 2;
	if (b->p && cap == b->cap)
		return 1;
	if (!(np = realloc(b->p, cap))) {
		b->oom = 1;
		return 0;
	}
	b->p = np, b->cap = cap;
	return 1;
}

void os_buf_reset(os_buf *b, size_t keep) {
	if (b->cap > keep)
		os_buf_free(b);
	b->n = 0, b->oom = 0;
}

void os_buf_free(os_buf *b) {
	free(b->p);
	b->p = NULL;
	b->n = b->cap = 0;
	b->oom = 0;
}
