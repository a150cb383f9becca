/* fault.so: a test-only LD_PRELOAD shim that makes writes to files under $FAULT_DIR fail
 * with EROFS while the file $FAULT_DIR.on exists, so specs can turn a running server's
 * storage read-only and back (a real remount is refused while sqlite holds the file
 * open for writing). Nothing else is touched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static int faulty(int fd) {
	const char *dir = getenv("FAULT_DIR");
	char link[64], path[PATH_MAX], flag[PATH_MAX];
	struct stat sb;
	ssize_t n;
	if (!dir || !*dir)
		return 0;
	snprintf(flag, sizeof flag, "%s.on", dir);
	if (stat(flag, &sb) != 0)
		return 0;
	snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
	n = readlink(link, path, sizeof path - 1);
	if (n <= 0)
		return 0;
	path[n] = '\0';
	return strncmp(path, dir, strlen(dir)) == 0;
}

/* Calls the real function; memcpy because ISO C has no object-to-function pointer cast. */
#define CALL_NEXT(name, ...) do { \
	name##_fn f_; \
	void *p_ = dlsym(RTLD_NEXT, #name); \
	memcpy(&f_, &p_, sizeof f_); \
	return f_(__VA_ARGS__); \
} while (0)

typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*pwrite64_fn)(int, const void *, size_t, off_t);
typedef int (*ftruncate_fn)(int, off_t);
typedef int (*fsync_fn)(int);
typedef int (*fdatasync_fn)(int);

ssize_t write(int fd, const void *buf, size_t len) {
	if (faulty(fd)) { errno = EROFS; return -1; }
	CALL_NEXT(write, fd, buf, len);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off) {
	if (faulty(fd)) { errno = EROFS; return -1; }
	CALL_NEXT(pwrite, fd, buf, len, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off) {
	if (faulty(fd)) { errno = EROFS; return -1; }
	CALL_NEXT(pwrite64, fd, buf, len, off);
}

int ftruncate(int fd, off_t len) {
	if (faulty(fd)) { errno = EROFS; return -1; }
	CALL_NEXT(ftruncate, fd, len);
}

int fsync(int fd) {
	if (faulty(fd)) { errno = EROFS; return -1; }
	CALL_NEXT(fsync, fd);
}

int fdatasync(int fd) {
	if (faulty(fd)) { errno = EROFS; return -1; }
	CALL_NEXT(fdatasync, fd);
}
