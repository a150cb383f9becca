/* bench/baseline.c: the yardstick for `make bench` (bench/core.lua), and its
 * bulk loader. Links sqlite3 only; knows nothing of the core.
 *
 *   bench_core baseline --db PATH --rows N [--per-user K] [--targets T]
 *                       [--reps R] [--min-time S] [--sync normal|full] [--all-indexes]
 *     If PATH does not exist, creates it: the plain table an offline store
 *     would start from (id INTEGER PRIMARY KEY AUTOINCREMENT, host, user, ts,
 *     expire, sender, stanza BLOB, meta) with a (host, user, id) index, in
 *     WAL mode, prefilled with N rows (K per user, users interleaved) in one
 *     transaction. Then opens it at the given synchronous level (default
 *     NORMAL) and R times (R may be 0: prefill only) inserts rows with one
 *     prepared INSERT per transaction (autocommit) round-robin to T users
 *     spread over the prefilled ones, for at least S seconds, and deletes
 *     them again, untimed, so the file is left at N rows for the next call.
 *     --all-indexes (at creation) adds ts and expire indexes, for
 *     attributing cost; the baseline proper is without. (The core itself
 *     clusters messages by (host, user, id) and indexes only expire.)
 *
 *   bench_core prefill --db PATH --rows N [--per-user K]
 *     Bulk-loads N rows (K per user) into a core database that
 *     offline_store.core has already created (schema version 1): the same
 *     rows as above, ids from 1, the id sequence and the matching per-user
 *     `queue` counter rows, in one
 *     transaction. Used because filling 1M rows through db:store, one
 *     transaction each, takes minutes.
 *
 * Output: one line of space-separated key=value pairs per run, starting with
 * the mode, e.g.
 *   baseline rows=1000 sync=NORMAL reps=5 median_ops_s=1234.5 ...
 * Rows, users and stanzas are generated exactly as bench/core.lua does. */
#define _POSIX_C_SOURCE 200809L

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sqlite3.h>

#define HOST "chat.example.org"
#define POOL 64 /* distinct stanzas, cycled */
#define CORE_APPLICATION_ID 0x4f464c53 /* "OFLS", see src/backend_sqlite.c */
#define MAX_REPS 101

/* ---- the generator; keep in step with bench/core.lua ---------------------- */

static const char *const first_names[16] = {
	"alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
	"ivan", "judy", "mallory", "niaj", "olivia", "peggy", "rupert", "sybil",
};
static const char *const last_names[16] = {
	"martin", "bernard", "dubois", "thomas", "robert", "richard", "petit", "durand",
	"leroy", "moreau", "simon", "laurent", "lefebvre", "michel", "garcia", "david",
};
static const char *const bodies[8] = {
	"Are you around later? I pushed the fix.",
	"Meeting moved to 3pm, same room as usual.",
	"Thanks! Got the files, will review tonight.",
	"Did you see the deploy alert at midnight?",
	"Lunch on Friday? New ramen place nearby.",
	"Can you send me the link to the doc again?",
	"Running 10 minutes late, start without me.",
	"Happy birthday!! Drinks on me next time :)",
};

/* The local part of user i's JID (users are numbered from 0). */
static void user_name(char *buf, size_t n, long i) {
	snprintf(buf, n, "%s.%s%ld", first_names[i % 16], last_names[(i / 16) % 16], i);
}

/* The full JID of the sender of message k (another user, with a resource). */
static void sender_jid(char *buf, size_t n, long k) {
	char u[64];
	user_name(u, sizeof u, (k * 7919) % 100000);
	snprintf(buf, n, "%s@" HOST "/%s-%04lx", u, (k & 1) ? "conversations" : "gajim",
	         (unsigned long)((k * 2654435761u) & 0xffff));
}

/* Stanza number k of the pool, addressed to nobody in particular (the
 * payload is opaque to the store): about 300 bytes. */
static int stanza(char *buf, size_t n, long k) {
	char from[128];
	sender_jid(from, sizeof from, k);
	return snprintf(buf, n,
	                "<message xmlns='jabber:client' from='%s' type='chat' id='m%08lx'>"
	                "<body>%s</body>"
	                "<active xmlns='http://jabber.org/protocol/chatstates'/>"
	                "<delay xmlns='urn:xmpp:delay' from='" HOST "' stamp='2024-05-%02ldT%02ld:%02ld:%02ldZ'/>"
	                "</message>",
	                from, (unsigned long)(k * 40503u) & 0xffffffffUL, bodies[k % 8],
	                1 + k % 28, k % 24, k % 60, (k * 7) % 60);
}

/* ---- helpers ---------------------------------------------------------------- */

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2), noreturn))
#endif
static void die(const char *fmt, ...);

static void die(const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	fputs("bench_core: ", stderr);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void check(sqlite3 *db, int rc, int want, const char *what) {
	if (rc != want)
		die("%s: %s (%d)", what, sqlite3_errmsg(db), rc);
}

static void exec(sqlite3 *db, const char *sql) {
	char *err = NULL;
	if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK)
		die("%s: %s", sql, err ? err : sqlite3_errmsg(db));
}

static sqlite3_stmt *prepare(sqlite3 *db, const char *sql) {
	sqlite3_stmt *st = NULL;
	check(db, sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL), SQLITE_OK, sql);
	return st;
}

static sqlite3 *open_db(const char *path) {
	sqlite3 *db = NULL;
	int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
	                         NULL);
	if (rc != SQLITE_OK)
		die("%s: %s", path, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
	return db;
}

/* Removes a database file and its WAL companions, if there. */
static void remove_db(const char *path) {
	static const char *const suffix[] = {"", "-wal", "-shm", "-journal"};
	char side[4096 + 16];
	size_t i;
	for (i = 0; i < sizeof suffix / sizeof *suffix; i++) {
		snprintf(side, sizeof side, "%s%s", path, suffix[i]);
		remove(side);
	}
}

static double now_s(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double median(double *v, int n) {
	qsort(v, (size_t)n, sizeof *v, cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static long parse_long(const char *s, const char *what) {
	char *end;
	long v = strtol(s, &end, 10);
	if (*s == '\0' || *end != '\0' || v < 0)
		die("bad %s: %s", what, s);
	return v;
}

typedef struct {
	char pool[POOL][512];
	int pool_n[POOL];
	char from[POOL][128];
} payloads;

static void make_payloads(payloads *p) {
	int k;
	for (k = 0; k < POOL; k++) {
		p->pool_n[k] = stanza(p->pool[k], sizeof p->pool[k], k);
		sender_jid(p->from[k], sizeof p->from[k], k);
	}
}

/* The user that row k (k = 0 .. rows-1) goes to: users are filled in blocks
 * of 100 (the last block may be narrower), round-robin within a block, as
 * mixed traffic would interleave them. */
static long row_user(long k, long per_user, long users) {
	long block_first = k / (100 * per_user) * 100;
	long width = users - block_first < 100 ? users - block_first : 100;
	return block_first + k % (100 * per_user) % width;
}

/* Inserts `rows` rows through `ins` (?1 host .. ?7 meta), ts from ts0. */
static void fill(sqlite3 *db, sqlite3_stmt *ins, const payloads *p, long rows, long per_user,
                 long long ts0) {
	char user[64];
	long k, users = (rows + per_user - 1) / per_user;
	for (k = 0; k < rows; k++) {
		int pk = (int)(k % POOL);
		user_name(user, sizeof user, row_user(k, per_user, users));
		sqlite3_reset(ins);
		sqlite3_bind_text(ins, 1, HOST, -1, SQLITE_STATIC);
		sqlite3_bind_text(ins, 2, user, -1, SQLITE_TRANSIENT);
		sqlite3_bind_int64(ins, 3, ts0 + (long long)k * 1000);
		sqlite3_bind_null(ins, 4);
		sqlite3_bind_text(ins, 5, p->from[pk], -1, SQLITE_STATIC);
		sqlite3_bind_blob(ins, 6, p->pool[pk], p->pool_n[pk], SQLITE_STATIC);
		sqlite3_bind_null(ins, 7);
		check(db, sqlite3_step(ins), SQLITE_DONE, "prefill insert");
	}
	sqlite3_reset(ins);
}

static const char insert_sql[] =
	"INSERT INTO message(host, user, ts, expire, sender, stanza, meta) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

/* Bulk mode: no journal, no syncs, a large cache. */
static void bulk_begin(sqlite3 *db) {
	exec(db, "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;");
	exec(db, "BEGIN");
}

/* ---- prefill (the core's own schema) ---------------------------------------- */

static int cmd_prefill(int argc, char **argv) {
	const char *path = NULL;
	long rows = -1, per_user = 100, users;
	int i;
	sqlite3 *db;
	sqlite3_stmt *st, *ins;
	long long app = 0;
	payloads *p = malloc(sizeof *p);
	double t0 = now_s();
	if (!p)
		die("out of memory");
	for (i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--db") && i + 1 < argc)
			path = argv[++i];
		else if (!strcmp(argv[i], "--rows") && i + 1 < argc)
			rows = parse_long(argv[++i], "--rows");
		else if (!strcmp(argv[i], "--per-user") && i + 1 < argc)
			per_user = parse_long(argv[++i], "--per-user");
		else
			die("prefill: unknown argument %s", argv[i]);
	}
	if (!path || rows < 0 || per_user < 1)
		die("prefill: need --db PATH --rows N");
	make_payloads(p);
	db = open_db(path);
	st = prepare(db, "PRAGMA application_id");
	if (sqlite3_step(st) == SQLITE_ROW)
		app = sqlite3_column_int64(st, 0);
	sqlite3_finalize(st);
	if (app != CORE_APPLICATION_ID)
		die("%s: not a database created by offline_store.core", path);
	bulk_begin(db);
	/* The core's table takes its ids from `sequence`: fill a rowid table the
	 * same way as the baseline, then copy in id order, as stores would write it
	 * (users interleaved, so a user's messages are spread over the table). */
	exec(db, "CREATE TEMP TABLE fill(host, user, ts, expire, sender, stanza, meta)");
	ins = prepare(db, "INSERT INTO fill(host, user, ts, expire, sender, stanza, meta) "
	                  "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
	fill(db, ins, p, rows, per_user, 1700000000000000LL);
	sqlite3_finalize(ins);
	/* The per-user counter rows the core keeps in step with `message` (schema
	 * version 4: their ids key the messages), then the messages in id order. */
	exec(db, "INSERT INTO queue(host, user, count, bytes) "
	         "SELECT host, user, count(*), sum(length(stanza)) FROM fill GROUP BY host, user;"
	         "INSERT INTO message(qid, id, ts, expire, sender, stanza, meta) "
	         "SELECT q.id, f.rowid, f.ts, f.expire, f.sender, f.stanza, f.meta FROM fill AS f "
	         "JOIN queue AS q ON q.host = f.host AND q.user = f.user ORDER BY f.rowid;"
	         "UPDATE sequence SET value = (SELECT coalesce(max(rowid), 0) FROM fill) WHERE name = 'message';"
	         "DROP TABLE fill;");
	users = (rows + per_user - 1) / per_user;
	exec(db, "COMMIT");
	exec(db, "PRAGMA journal_mode = WAL;");
	check(db, sqlite3_close(db), SQLITE_OK, "close");
	printf("prefill rows=%ld users=%ld seconds=%.3f\n", rows, users, now_s() - t0);
	free(p);
	return 0;
}

/* ---- baseline --------------------------------------------------------------- */

static int cmd_baseline(int argc, char **argv) {
	const char *path = NULL;
	long rows = -1, per_user = 100, ntargets = 100, reps = 5, users, j;
	double min_time = 0.5, t_prefill = 0, ops_s[MAX_REPS];
	int full = 0, all_indexes = 0, fresh, i, r;
	char (*targets)[64], pragmas[128];
	long long last_id, total_ops = 0, ts = 1800000000000000LL;
	sqlite3 *db;
	sqlite3_stmt *ins, *del, *st;
	FILE *f;
	payloads *p = malloc(sizeof *p);
	if (!p)
		die("out of memory");
	for (i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--db") && i + 1 < argc)
			path = argv[++i];
		else if (!strcmp(argv[i], "--rows") && i + 1 < argc)
			rows = parse_long(argv[++i], "--rows");
		else if (!strcmp(argv[i], "--per-user") && i + 1 < argc)
			per_user = parse_long(argv[++i], "--per-user");
		else if (!strcmp(argv[i], "--targets") && i + 1 < argc)
			ntargets = parse_long(argv[++i], "--targets");
		else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
			reps = parse_long(argv[++i], "--reps");
		else if (!strcmp(argv[i], "--min-time") && i + 1 < argc)
			min_time = atof(argv[++i]);
		else if (!strcmp(argv[i], "--sync") && i + 1 < argc) {
			const char *s = argv[++i];
			if (!strcmp(s, "full"))
				full = 1;
			else if (strcmp(s, "normal") != 0)
				die("--sync: normal or full, not %s", s);
		} else if (!strcmp(argv[i], "--all-indexes"))
			all_indexes = 1;
		else
			die("baseline: unknown argument %s", argv[i]);
	}
	if (!path || rows < 1 || per_user < 1 || ntargets < 1 || reps > MAX_REPS)
		die("baseline: need --db PATH --rows N (N >= 1), --reps <= %d", MAX_REPS);
	make_payloads(p);
	users = (rows + per_user - 1) / per_user;
	if (ntargets > users)
		ntargets = users;

	/* No file yet: create it and fill it in one transaction. */
	f = fopen(path, "rb");
	fresh = f == NULL;
	if (f)
		fclose(f);
	if (fresh) {
		t_prefill = now_s();
		remove_db(path);
		db = open_db(path);
		exec(db, "CREATE TABLE message ("
		         " id INTEGER PRIMARY KEY AUTOINCREMENT,"
		         " host TEXT NOT NULL, user TEXT NOT NULL,"
		         " ts INTEGER NOT NULL, expire INTEGER,"
		         " sender TEXT NOT NULL, stanza BLOB NOT NULL, meta BLOB);"
		         "CREATE INDEX message_user ON message(host, user, id);");
		if (all_indexes)
			exec(db, "CREATE INDEX message_expire ON message(expire) WHERE expire IS NOT NULL;"
			         "CREATE INDEX message_ts ON message(ts);");
		bulk_begin(db);
		ins = prepare(db, insert_sql);
		fill(db, ins, p, rows, per_user, 1700000000000000LL);
		sqlite3_finalize(ins);
		exec(db, "COMMIT");
		exec(db, "PRAGMA journal_mode = WAL;");
		check(db, sqlite3_close(db), SQLITE_OK, "close");
		t_prefill = now_s() - t_prefill;
	}

	/* (Re)opened the way the core opens its file. */
	db = open_db(path);
	sqlite3_busy_timeout(db, 2000);
	snprintf(pragmas, sizeof pragmas, "PRAGMA journal_mode = WAL; PRAGMA synchronous = %s;",
	         full ? "FULL" : "NORMAL");
	exec(db, pragmas);
	st = prepare(db, "SELECT max(id) FROM message");
	check(db, sqlite3_step(st), SQLITE_ROW, "max(id)");
	last_id = sqlite3_column_int64(st, 0);
	sqlite3_finalize(st);
	if (last_id != rows)
		die("%s: holds ids up to %lld, not %ld: not a baseline file of this size", path, last_id, rows);
	ins = prepare(db, insert_sql);
	del = prepare(db, "DELETE FROM message WHERE id > ?1");
	sqlite3_bind_int64(del, 1, last_id);

	targets = malloc((size_t)ntargets * sizeof *targets);
	if (!targets)
		die("out of memory");
	for (j = 0; j < ntargets; j++)
		user_name(targets[j], sizeof targets[j], j * users / ntargets);

	for (r = 0; r < reps; r++) {
		long n = 0;
		double t0 = now_s(), dt;
		do {
			int c;
			for (c = 0; c < 50; c++, n++) {
				int pk = (int)(n % POOL);
				sqlite3_bind_text(ins, 1, HOST, -1, SQLITE_STATIC);
				sqlite3_bind_text(ins, 2, targets[n % ntargets], -1, SQLITE_STATIC);
				sqlite3_bind_int64(ins, 3, ts++);
				sqlite3_bind_null(ins, 4);
				sqlite3_bind_text(ins, 5, p->from[pk], -1, SQLITE_STATIC);
				sqlite3_bind_blob(ins, 6, p->pool[pk], p->pool_n[pk], SQLITE_STATIC);
				sqlite3_bind_null(ins, 7);
				check(db, sqlite3_step(ins), SQLITE_DONE, "insert");
				sqlite3_reset(ins);
			}
			dt = now_s() - t0;
		} while (dt < min_time);
		ops_s[r] = (double)n / dt;
		total_ops += n;
		/* Back to the prefilled size, outside the timing. */
		check(db, sqlite3_step(del), SQLITE_DONE, "delete");
		sqlite3_reset(del);
	}
	sqlite3_finalize(ins);
	sqlite3_finalize(del);
	check(db, sqlite3_close(db), SQLITE_OK, "close");

	printf("baseline rows=%ld users=%ld targets=%ld sync=%s indexes=%s reps=%ld ops=%lld",
	       rows, users, ntargets, full ? "FULL" : "NORMAL", all_indexes ? "all" : "user",
	       reps, total_ops);
	if (reps > 0) {
		double lo = ops_s[0], hi = ops_s[0];
		for (r = 1; r < reps; r++) {
			lo = ops_s[r] < lo ? ops_s[r] : lo;
			hi = ops_s[r] > hi ? ops_s[r] : hi;
		}
		printf(" min_ops_s=%.1f max_ops_s=%.1f", lo, hi);
		printf(" median_ops_s=%.1f", median(ops_s, (int)reps));
	}
	printf(" prefilled=%d prefill_s=%.3f sqlite=%s\n", fresh, t_prefill, sqlite3_libversion());
	free(targets);
	free(p);
	return 0;
}

int main(int argc, char **argv) {
	if (argc >= 2 && !strcmp(argv[1], "baseline"))
		return cmd_baseline(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "prefill"))
		return cmd_prefill(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "version")) {
		printf("version sqlite=%s\n", sqlite3_libversion());
		return 0;
	}
	fprintf(stderr,
	        "usage: %s baseline --db PATH --rows N [--per-user K] [--targets T] [--reps R]\n"
	        "                   [--min-time S] [--sync normal|full] [--all-indexes]\n"
	        "       %s prefill --db PATH --rows N [--per-user K]\n"
	        "       %s version\n",
	        argv[0], argv[0], argv[0]);
	return 2;
}
