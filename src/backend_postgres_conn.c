/* The postgres backend's connection: failures, transactions, reconnection
 * and transactions in doubt.
 *
 * Failures: runtime errors return OS_FAIL with the server's message and its
 * SQLSTATE as a base-36 number (Lua: tonumber("40P01", 36)); code 0 means
 * the connection is down (lost, unreachable, or refused at open). A lost
 * connection fails the call in flight (its transaction is rolled back by the
 * server, nothing is half-written).
 *
 * Connecting never waits on the network (Prosody has one thread): open starts
 * the connection (PQconnectStartParams) and a lost one is started again
 * (PQresetStart) by the next call, at most once per backoff interval (250 ms
 * doubling to 8 s after each failed attempt). Every call that finds an attempt
 * under way moves it on by polling its socket; the calls wait for one attempt
 * CONNECT_INLINE_MS in all (open: OPEN_INLINE_MS), so that a server that is
 * there is connected to at once, and otherwise fail at once ("PostgreSQL is
 * unreachable ..."). An attempt not done within connect_timeout has failed.
 * What still blocks: libpq's host name lookup (getaddrinfo; hence the advice
 * to give an address), and a statement on an established connection, which
 * waits for its answer (statement_timeout and lock_timeout bound a server
 * that answers: backend_postgres_schema.c's pg_setup sets them), and the
 * resolution of a lost COMMIT below. A new session is set up (timeouts,
 * schema once per store, statements prepared) on its first call.
 *
 * In doubt: a connection lost after COMMIT was sent and before its answer
 * came leaves the outcome unknown. pop, remove and remove_user learn their
 * transaction's id while they hold the user's lock, and then reconnect and
 * ask the server (txid_status) before answering: committed is a success
 * (pop returns what it read), rolled back a failure. store is one statement
 * in its own implicit transaction and is not resolved: if its answer is lost
 * it reports failure although the message may be stored. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend_postgres.h"

#define BACKOFF_MIN_MS 250
#define BACKOFF_MAX_MS 8000
#define IN_DOUBT_WAIT_MS 3000 /* the longest a lost COMMIT's outcome is waited for */
#define IN_DOUBT_POLL_MS 20
#define IN_DOUBT_CONNECT_MS 1000 /* what resolving waits for the new connection */
#define OPEN_INLINE_MS 200    /* what open waits for the first connection */
#define CONNECT_INLINE_MS 50  /* what the calls wait for one reconnection, in all */

/* Copies libpq's text with every run of whitespace as one space. */
void pg_tidy(char *dst, size_t size, const char *src) {
	size_t n = 0;
	int space = 0;
	for (; src && *src && n + 1 < size; src++) {
		if (*src == ' ' || *src == '\n' || *src == '\t' || *src == '\r') {
			space = n > 0;
			continue;
		}
		if (space && n + 2 < size)
			dst[n++] = ' ';
		space = 0;
		dst[n++] = *src;
	}
	dst[n] = '\0';
}

/* SQLSTATE as a base-36 number: what Lua's tonumber(state, 36) gives. */
int pg_sqlstate_code(const char *state) {
	int code = 0, i;
	for (i = 0; state && i < 5 && state[i]; i++) {
		char c = state[i];
		code = code * 36 + (c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'Z' ? c - 'A' + 10 : 0);
	}
	return code;
}

/* Records why `r` (or the connection) failed; call before any rollback. */
int pgfail(os_store *s, pg *g, const PGresult *r) {
	char msg[200];
	const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
	const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
	pg_tidy(msg, sizeof msg, primary ? primary : PQerrorMessage(g->conn));
	if (PQstatus(g->conn) != CONNECTION_OK)
		return os_fail(s, 0, "lost the connection to PostgreSQL (reconnecting on the next call): %s%s%s%s",
		               msg, state ? " (SQLSTATE " : "", state ? state : "", state ? ")" : "");
	if (state)
		return os_fail(s, pg_sqlstate_code(state), "%s (SQLSTATE %s)", msg, state);
	return os_fail(s, 0, "%s", msg[0] ? msg : "PostgreSQL call failed");
}

/* Runs a plain command (BEGIN, COMMIT, ROLLBACK); 1 when it succeeded. */
int pg_command(pg *g, const char *sql) {
	PGresult *r = PQexec(g->conn, sql);
	int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
	PQclear(r);
	return ok;
}

int pg_begin(os_store *s, pg *g) {
	PGresult *r = PQexec(g->conn, "BEGIN");
	int rc = result_ok(r) ? OS_OK : pgfail(s, g, r);
	PQclear(r);
	return rc;
}

/* Records the failure of `r`, then rolls back whatever is open. */
int pg_abort_tx(os_store *s, pg *g, const PGresult *r) {
	pgfail(s, g, r);
	if (PQstatus(g->conn) == CONNECTION_OK && PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		pg_command(g, "ROLLBACK");
	return OS_FAIL;
}

int pg_commit(os_store *s, pg *g) {
	PGresult *r = PQexec(g->conn, "COMMIT");
	int rc = result_ok(r) ? OS_OK : pg_abort_tx(s, g, r);
	PQclear(r);
	return rc;
}


void pg_quiet(void *arg, const char *message) {
	(void)arg;
	(void)message;
}

static int64_t now_ms(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int64_t ms_until(const struct timespec *t) {
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int64_t)(t->tv_sec - now.tv_sec) * 1000 + (t->tv_nsec - now.tv_nsec) / 1000000;
}

/* True when the idle connection has input waiting: the server said goodbye
 * (a restart sends FATAL, then closes). Reading it marks the connection bad. */
static void notice_hangup(pg *g) {
	int tries;
	for (tries = 0; tries < 4 && PQstatus(g->conn) == CONNECTION_OK; tries++) {
		struct pollfd fd;
		fd.fd = PQsocket(g->conn);
		fd.events = POLLIN;
		fd.revents = 0;
		if (fd.fd < 0 || poll(&fd, 1, 0) <= 0)
			return;
		if (!PQconsumeInput(g->conn))
			return;
	}
}

/* An attempt was started (PQconnectStartParams or PQresetStart): calls may
 * wait for it budget_ms in all; it gives up after connect_timeout. */
static void attempt_begun(pg *g, int resetting, int budget_ms) {
	g->connecting = 1;
	g->resetting = resetting;
	g->ready = 0;
	g->polling = PGRES_POLLING_WRITING; /* what libpq says to assume at first */
	g->inline_left_ms = budget_ms;
	g->started_ms = now_ms();
	g->give_up_ms = g->started_ms + g->attempt_ms;
}

/* Drives the attempt under way: polls its socket for what libpq waits for,
 * for what is left of inline_left_ms (which it uses up; 0: only looks), and
 * hands each readiness to libpq. 1: connected; 0: still under way; -1: failed. */
static int drive(pg *g) {
	for (;;) {
		struct pollfd fd;
		int64_t t0;
		int n;
		if (g->polling == PGRES_POLLING_OK)
			return 1;
		if (g->polling == PGRES_POLLING_FAILED)
			return -1;
		fd.fd = PQsocket(g->conn);
		fd.events = g->polling == PGRES_POLLING_READING ? POLLIN : POLLOUT;
		fd.revents = 0;
		t0 = now_ms();
		n = fd.fd < 0 ? 1 : poll(&fd, 1, g->inline_left_ms > 0 ? g->inline_left_ms : 0);
		g->inline_left_ms -= (int)(now_ms() - t0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0)
			return 0;
		g->polling = g->resetting ? PQresetPoll(g->conn) : PQconnectPoll(g->conn);
	}
}

/* Where an attempt stands: OS_OK once connected and set up; else OS_FAIL with
 * code 0, having started the backoff if the attempt failed or ran out of time. */
static int attempt(os_store *s, pg *g, const char *failed) {
	int st = drive(g);
	if (st == 0 && now_ms() >= g->give_up_ms) {
		snprintf(g->down, sizeof g->down, "no answer within %d ms", g->attempt_ms);
		st = -2;
	}
	if (st == 0)
		return os_fail(s, 0, "PostgreSQL is unreachable (connecting for %lld ms): %s",
		               (long long)(now_ms() - g->started_ms), g->down[0] ? g->down : "no answer yet");
	g->connecting = 0;
	if (st < 0) {
		if (st == -1)
			pg_tidy(g->down, sizeof g->down, PQerrorMessage(g->conn));
		g->backoff_ms = g->backoff_ms ? g->backoff_ms * 2 : BACKOFF_MIN_MS;
		if (g->backoff_ms > BACKOFF_MAX_MS)
			g->backoff_ms = BACKOFF_MAX_MS;
		clock_gettime(CLOCK_MONOTONIC, &g->retry_at);
		g->retry_at.tv_sec += g->backoff_ms / 1000;
		g->retry_at.tv_nsec += (long)(g->backoff_ms % 1000) * 1000000L;
		if (g->retry_at.tv_nsec >= 1000000000L)
			g->retry_at.tv_sec++, g->retry_at.tv_nsec -= 1000000000L;
		return os_fail(s, 0, "%s: %s", failed, g->down);
	}
	g->backoff_ms = 0;
	g->down[0] = '\0';
	g->pid = PQbackendPID(g->conn);
	return pg_setup(s, g);
}

/* The first connection, from open: waited for up to OPEN_INLINE_MS. A refusal
 * fails the open; an attempt still under way then is left to the calls. */
int pg_first_connect(os_store *s, pg *g) {
	PQconninfoOption *opts = PQconninfo(g->conn), *o;
	g->attempt_ms = 0;
	for (o = opts; o && o->keyword; o++)
		if (strcmp(o->keyword, "connect_timeout") == 0 && o->val)
			g->attempt_ms = atoi(o->val) * 1000;
	PQconninfoFree(opts);
	if (g->attempt_ms < 2000) /* libpq's own floor; 0 (wait forever) included */
		g->attempt_ms = 2000;
	attempt_begun(g, 0, OPEN_INLINE_MS);
	if (attempt(s, g, "cannot connect to PostgreSQL") == OS_OK || g->connecting)
		return OS_OK;
	return OS_FAIL;
}

/* Connects a connection that is down without waiting on the network: starts
 * an attempt (at most once per backoff interval, so a dead server does not
 * cost every call) or goes on with the one under way; the calls that find it
 * under way wait for it budget_ms in all. */
static int reconnect(os_store *s, pg *g, int budget_ms) {
	if (!g->connecting) {
		if (g->backoff_ms > 0 && ms_until(&g->retry_at) > 0)
			return os_fail(s, 0, "PostgreSQL is unreachable (next reconnection attempt in %lld ms): %s",
			               (long long)ms_until(&g->retry_at), g->down);
		attempt_begun(g, 1, budget_ms);
		if (!PQresetStart(g->conn))
			g->polling = PGRES_POLLING_FAILED;
	}
	return attempt(s, g, "PostgreSQL is unreachable (reconnecting failed)");
}

/* The recover step (backend.h's cleanup rule); every call starts here: frees
 * a result an abandoned call left behind, connects a connection that is down
 * (reconnect: fails at once while it is not up), sets up a new session and
 * rolls back a transaction an abandoned call left open. */
int pg_recover(os_store *s, pg *g) {
	if (g->live) {
		PQclear(g->live);
		g->live = NULL;
	}
	notice_hangup(g);
	/* A pipeline left unfinished on a live connection (a batch's drain cut short,
	 * backend_postgres_batch.c) keeps libpq in pipeline mode, where no plain call
	 * works: a new connection. */
	if ((g->connecting || PQstatus(g->conn) != CONNECTION_OK ||
	     PQpipelineStatus(g->conn) != PQ_PIPELINE_OFF) &&
	    reconnect(s, g, CONNECT_INLINE_MS) != OS_OK)
		return OS_FAIL;
	if (!g->ready && pg_setup(s, g) != OS_OK)
		return OS_FAIL;
	if (PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		pg_command(g, "ROLLBACK");
	return OS_OK;
}

/* The abandon step (backend.h): an emit raised in the middle of a call, which
 * is left at once. The result it read goes, and its transaction is rolled back
 * now, so its row locks do not hold other nodes' calls until this store's next
 * call. */
void pg_abandon(os_store *s) {
	pg *g = s->impl;
	if (g->live) {
		PQclear(g->live);
		g->live = NULL;
	}
	if (PQstatus(g->conn) == CONNECTION_OK && PQtransactionStatus(g->conn) != PQTRANS_IDLE)
		pg_command(g, "ROLLBACK");
}

/* What became of transaction `xid`, asked on a new connection: 'c'ommitted,
 * 'a'borted, 'i'n progress, or 0 when the server could not say. */
static char xact_status(pg *g, int64_t xid) {
	char num[24];
	const char *val[1];
	PGresult *r;
	char st = 0;
	snprintf(num, sizeof num, "%lld", (long long)xid);
	val[0] = num;
	r = PQexecParams(g->conn, "SELECT txid_status($1::int8)", 1, NULL, val, NULL, NULL, 0);
	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
		st = PQgetvalue(r, 0, 0)[0];
	PQclear(r);
	return st;
}

static void sleep_ms(long ms) {
	struct timespec t;
	t.tv_sec = ms / 1000;
	t.tv_nsec = (ms % 1000) * 1000000L;
	nanosleep(&t, NULL);
}

/* Called when the connection was lost with COMMIT of transaction `xid` sent
 * and its answer missing: the transaction may or may not have committed.
 * Reconnects and asks the server. A transaction still running is the old
 * server process that has not noticed the lost client yet (or whose COMMIT
 * never arrived): it is terminated (our own role may), which settles it,
 * and waited for, up to IN_DOUBT_WAIT_MS. Returns OS_OK when it committed,
 * OS_FAIL when it did not, and `unknown` when the server cannot tell (it is
 * unreachable, or the wait ran out). The failure message stays that of the
 * lost COMMIT, with the outcome added. */
static int resolve(os_store *s, pg *g, int64_t xid, int unknown) {
	int old_pid = g->pid, waited = 0, terminated = 0;
	char lost[sizeof s->errmsg];
	memcpy(lost, s->errmsg, sizeof lost);
	if (xid <= 0)
		return unknown;
	g->backoff_ms = 0; /* one attempt now, whatever the backoff said */
	g->connecting = 0;
	if (reconnect(s, g, IN_DOUBT_CONNECT_MS) != OS_OK) {
		os_fail(s, 0, "%s; whether it committed is unknown", lost);
		return unknown;
	}
	for (;;) {
		char st = xact_status(g, xid);
		if (st == 'c')
			return OS_OK;
		if (st == 'a') {
			os_fail(s, 0, "%s; the transaction was rolled back", lost);
			return OS_FAIL;
		}
		if (st != 'i' || waited >= IN_DOUBT_WAIT_MS)
			break;
		if (!terminated && waited >= 5 * IN_DOUBT_POLL_MS && old_pid > 0) {
			char sql[64];
			snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)", old_pid);
			PQclear(PQexec(g->conn, sql));
			terminated = 1;
		}
		sleep_ms(IN_DOUBT_POLL_MS);
		waited += IN_DOUBT_POLL_MS;
	}
	os_fail(s, 0, "%s; whether it committed is unknown", lost);
	return unknown;
}

/* Commits the transaction `xid` (from ST_QUEUE_LOCK); if its answer is lost
 * with the connection, resolve()s what happened (`unknown` as there). */
int pg_commit_xid(os_store *s, pg *g, int64_t xid, int unknown) {
	int rc = pg_commit(s, g);
	if (rc != OS_OK && PQstatus(g->conn) != CONNECTION_OK)
		rc = resolve(s, g, xid, unknown);
	return rc;
}
