# offline-store: build the C core, run the specs, run the demo.
# Variable names are the ones LuaRocks passes; every one can be overridden.

LUA        ?= lua5.4
LUA_INCDIR ?= $(shell pkg-config --variable=includedir lua5.4 2>/dev/null || echo /usr/include)/lua5.4
CC         ?= cc
CFLAGS     ?= -O2 -g
LIBFLAG    ?= -shared
PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib/lua/5.4
LUADIR     ?= $(PREFIX)/share/lua/5.4

SQLITE_CFLAGS ?= $(shell pkg-config --cflags sqlite3 2>/dev/null)
SQLITE_LIBS   ?= $(shell pkg-config --libs sqlite3 2>/dev/null || echo -lsqlite3)

# The postgres backend (libpq) is optional: POSTGRES=yes or no; by default yes when libpq's
# headers are found (pkg-config libpq, else pg_config). Without it the core builds and opens
# sqlite and memory stores; core.open_postgres raises, naming what is missing.
POSTGRES ?= $(shell pkg-config --exists libpq 2>/dev/null && echo yes || \
              { pg_config --includedir >/dev/null 2>&1 && echo yes; } || echo no)
ifeq ($(POSTGRES),yes)
PQ_CFLAGS ?= $(shell pkg-config --cflags libpq 2>/dev/null || echo -I$$(pg_config --includedir 2>/dev/null || echo /usr/include/postgresql))
PQ_LIBS   ?= $(shell pkg-config --libs libpq 2>/dev/null || echo -lpq)
PQ_DEFS    = -DOS_WITH_POSTGRES
PQ_SRC     = src/backend_postgres.c src/backend_postgres_lease.c src/backend_postgres_batch.c src/backend_postgres_conn.c src/backend_postgres_schema.c
else ifeq ($(POSTGRES),no)
PQ_CFLAGS  =
PQ_LIBS    =
PQ_DEFS    =
PQ_SRC     =
else
$(error POSTGRES=$(POSTGRES): say yes or no)
endif

# Kept apart from CFLAGS so that a user's CFLAGS keeps them.
WARN      = -std=c99 -Wall -Wextra -pedantic -Wshadow -Wformat=2 -Wstrict-prototypes
ALLCFLAGS = $(WARN) $(CFLAGS) -fPIC -fvisibility=hidden -I$(LUA_INCDIR) $(SQLITE_CFLAGS) $(PQ_CFLAGS) $(PQ_DEFS)

BASE_SRC = src/core.c src/xml.c src/cache.c src/hash.c src/buffer.c src/backend_sqlite.c src/backend_sqlite_batch.c \
           src/backend_sqlite_schema.c src/backend_memory.c
SRC  = $(BASE_SRC) $(PQ_SRC)
HDR  = src/backend.h src/backend_sqlite.h src/backend_postgres.h src/xml.h src/cache.h src/hash.h src/buffer.h
CORE = build/offline_store/core.so
# Rewritten when POSTGRES changes, so that the cores are rebuilt for the other choice.
BUILD_CHOICE = build/.postgres-$(POSTGRES)
# A core without PostgreSQL support next to the normal one, for spec/core_nopostgres_spec.lua.
NOPG_CORE = build/nopg/offline_store/core.so
# The sanitizer build lives apart, so `make test` and `make test-asan` never mix objects.
ASAN_CORE = build/asan/offline_store/core.so
ASAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

# Debian packages the build, the specs and the demo need (lua-dbi-sqlite3: Prosody's SQL storage on
# sqlite, which spec/migrate_spec.lua imports from and exports to).
DEBS = lua5.4 liblua5.4-dev lua-unit lua-socket libsqlite3-dev sqlite3 luarocks pkg-config prosody gcc make postgresql libpq-dev \
       clang libclang-rt-14-dev lua-check prosody-modules lua-dbi-sqlite3 python3-slixmpp

SPECS ?= $(wildcard spec/*_spec.lua)
# The specs that start a Prosody run once per Prosody version; the others once.
SERVER_SPECS = $(shell grep -l -e 'support\.prosody' -e 'support\.offline' $(SPECS) /dev/null)
UNIT_SPECS   = $(filter-out $(SERVER_SPECS),$(SPECS))

# Which Prosody the server specs run against: 0.12 (the system's), 13, or both.
PROSODY ?= both
# Prosody 13 next to the system's 0.12: the bookworm-backports .deb, unpacked (not installed) under
# build/prosody13 with a private apt state; the system's apt sources and packages stay as they are.
P13          = build/prosody13
P13_PACKAGE ?= prosody/bookworm-backports
P13_APT      = apt-get -q -o Dir::Etc::SourceList=$(CURDIR)/$(P13)/apt/sources.list \
               -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists=$(CURDIR)/$(P13)/apt/lists \
               -o Dir::Cache=$(CURDIR)/$(P13)/apt/cache -o APT::Sandbox::User=$$(id -un)
P13_ENV      = PROSODY_BIN=$(CURDIR)/$(P13)/bin/prosody PROSODYCTL_BIN=$(CURDIR)/$(P13)/bin/prosodyctl \
               PROSODY_LIB=$(CURDIR)/$(P13)/root/usr/lib/prosody
# The system's Prosody version ("0.12.3"), empty when there is none.
SYSTEM_PROSODY = prosodyctl about 2>/dev/null | sed -n 's/^Prosody \([0-9][0-9.]*\).*/\1/p' | head -n 1

.PHONY: all nopostgres deps lint test test-prosody prosody13 deps-prosody13 test-asan valgrind bench bench-postgres demo install clean fuzz bench-e2e bench-e2e-quick bench-e2e-postgres deps-bench-e2e bench-xml bench-batch bench-hash bench-drain

all: $(CORE)

$(BUILD_CHOICE):
	@mkdir -p $(dir $@)
	@rm -f build/.postgres-*
	@touch $@

$(CORE): $(SRC) $(HDR) $(BUILD_CHOICE)
	@mkdir -p $(dir $@)
	$(CC) $(ALLCFLAGS) $(LIBFLAG) -o $@ $(SRC) $(SQLITE_LIBS) $(PQ_LIBS)

$(ASAN_CORE): $(SRC) $(HDR) $(BUILD_CHOICE)
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(ASAN_FLAGS) -fPIC -I$(LUA_INCDIR) $(SQLITE_CFLAGS) $(PQ_CFLAGS) $(PQ_DEFS) -shared -o $@ $(SRC) $(SQLITE_LIBS) $(PQ_LIBS)

nopostgres: $(NOPG_CORE)

$(NOPG_CORE): $(BASE_SRC) $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -fPIC -fvisibility=hidden -I$(LUA_INCDIR) $(SQLITE_CFLAGS) $(LIBFLAG) -o $@ $(BASE_SRC) $(SQLITE_LIBS)

# $(call install_missing,packages): installs those of the Debian packages that are missing,
# non-interactively; does nothing when all are there.
define install_missing
missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

deps:
	@$(call install_missing,$(DEBS))
	@$(MAKE) --no-print-directory deps-prosody13

# What the unpacked Prosody 13 depends on (Debian 12's own Lua libraries), when it is there, and
# lua-unbound, which it recommends (without it every prosodyctl call prints a banner about it).
deps-prosody13:
	@[ -f $(P13)/DEPENDS ] || exit 0; d="$$(cat $(P13)/DEPENDS), lua-unbound"; \
	out=$$(apt-get satisfy -s --no-install-recommends "$$d" 2>&1) && ! printf '%s\n' "$$out" | grep -q '^Inst' && exit 0; \
	echo "installing what Prosody 13 depends on: $$d"; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get satisfy -y -qq --no-install-recommends "$$d" >/dev/null

# Fetches and unpacks Prosody 13 once (no network when it is there). The mirror is the one the
# system's own sources use for its Debian release; launchers in $(P13)/bin point at the tree.
prosody13: $(P13)/.ok

$(P13)/.ok:
	@mkdir -p $(P13)/apt/lists/partial $(P13)/apt/cache/archives/partial
	@set -e; cd $(P13); \
	if ! ls prosody_*.deb >/dev/null 2>&1; then \
	  mirror=$$(apt-get -o Dir::State::Lists=$(CURDIR)/$(P13)/apt/lists update --print-uris \
	    | sed -n "s|^'\(.*\)/dists/bookworm/InRelease'.*|\1|p" | head -n 1); \
	  [ -n "$$mirror" ] || { echo "no bookworm mirror in the system's apt sources" >&2; exit 1; }; \
	  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $$mirror bookworm-backports main" >apt/sources.list; \
	  $(P13_APT) update -qq; \
	  $(P13_APT) download $(P13_PACKAGE); \
	fi; \
	rm -rf root bin; dpkg-deb -x prosody_*.deb root; mkdir -p root/etc/prosody/conf.d; \
	dpkg-deb -f prosody_*.deb Depends >DEPENDS; \
	mkdir bin; for b in prosody prosodyctl; do \
	  sed -e "s|^CFG_SOURCEDIR=.*|CFG_SOURCEDIR='$(CURDIR)/$(P13)/root/usr/lib/prosody';|" \
	      -e "s|^CFG_CONFIGDIR=.*|CFG_CONFIGDIR='$(CURDIR)/$(P13)/root/etc/prosody';|" \
	      -e "s|^CFG_PLUGINDIR=.*|CFG_PLUGINDIR='$(CURDIR)/$(P13)/root/usr/lib/prosody/modules/';|" \
	      -e "s|^CFG_DATADIR=.*|CFG_DATADIR='$(CURDIR)/$(P13)/root/var/lib/prosody';|" root/usr/bin/$$b >bin/$$b; \
	  chmod 0755 bin/$$b; \
	done; \
	grep -q "^CFG_SOURCEDIR='$(CURDIR)" bin/prosody; \
	echo "unpacked Prosody $$(cat root/usr/lib/prosody/prosody.version) in $(P13)"
	@$(MAKE) --no-print-directory deps-prosody13
	@touch $@

# Test-only fault injection (spec/reliability_spec.lua): writes under a directory fail on demand.
FAULT = build/fault.so
$(FAULT): spec/support/fault.c
	@mkdir -p $(dir $@)
	$(CC) $(WARN) -O2 -fPIC -shared -o $@ $< -ldl

# Test-only: a Lua module whose allocator refuses large blocks on demand (spec/core_postgres_spec.lua,
# spec/core_sqlite_spec.lua: an emit that raises "not enough memory" in the middle of a pop).
ALLOC_FAULT = build/alloc_fault.so
$(ALLOC_FAULT): spec/support/alloc_fault.c
	@mkdir -p $(dir $@)
	$(CC) $(WARN) -O2 -fPIC -shared -I$(LUA_INCDIR) -o $@ $<

# luacheck over the Lua (.luacheckrc): a stray global, an unused value, a misspelt name.
lint:
	luacheck -q lua spec bench

# The lint, every spec against the normal build (the server specs against each Prosody PROSODY
# names), then the core specs against the sanitizer build.
test: deps $(CORE) $(NOPG_CORE) $(FAULT) $(ALLOC_FAULT)
	$(MAKE) --no-print-directory lint
	$(if $(UNIT_SPECS),$(LUA) spec/run.lua $(UNIT_SPECS))
	@$(MAKE) --no-print-directory test-prosody
	$(MAKE) --no-print-directory test-asan
	$(MAKE) --no-print-directory fuzz

# The server specs against the system's Prosody when it is the version asked for, else (13) the
# unpacked one. A system Prosody 13 is tested as 13; PROSODY=both then has no 0.12 to test.
test-prosody: $(CORE) $(FAULT)
	@sys=$$($(SYSTEM_PROSODY)); rc=0; \
	case "$(PROSODY)" in both) want="0.12 13";; 0.12|13) want="$(PROSODY)";; \
	  *) echo "PROSODY=$(PROSODY): say 0.12, 13 or both" >&2; exit 2;; esac; \
	for v in $$want; do \
	  case "$$sys" in \
	  "$$v"|"$$v".*) vars=; what="the system's Prosody $$sys";; \
	  *) if [ "$$v" = 13 ]; then \
	      $(MAKE) -s --no-print-directory prosody13 || exit 1; \
	      vars="$(P13_ENV)"; what="Prosody $$(cat $(P13)/root/usr/lib/prosody/prosody.version) ($(P13))"; \
	    elif [ "$(PROSODY)" = both ]; then \
	      echo "== the system's Prosody is $${sys:-missing}: no Prosody $$v to test"; continue; \
	    else \
	      echo "PROSODY=$$v: the system's Prosody is $${sys:-missing}" >&2; rc=1; continue; \
	    fi;; \
	  esac; \
	  echo "== server specs against $$what"; t=$$(date +%s); \
	  env $$vars $(LUA) spec/run.lua $(SERVER_SPECS) || rc=1; \
	  echo "== server specs against $$what: $$(( $$(date +%s) - t )) s"; \
	done; exit $$rc

# The core specs under AddressSanitizer + UBSan (the Lua interpreter is not
# instrumented, so the runtime is preloaded; leak checks cover the core).
test-asan: $(ASAN_CORE) $(NOPG_CORE) $(ALLOC_FAULT)
	OFFLINE_STORE_CPATH=$(CURDIR)/build/asan/?.so \
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(LUA) spec/run.lua spec/core_*_spec.lua

# A real Prosody on loopback: messages stored while Bob is offline, delivered at login.
demo: deps $(CORE)
	$(LUA) spec/demo.lua

valgrind: $(CORE) $(ALLOC_FAULT)
	valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
	  $(LUA) spec/run.lua spec/core_*_spec.lua

bench: $(CORE) build/bench_core
	$(LUA) bench/core.lua

bench-xml: $(CORE)
	$(LUA) bench/xml.lua

bench-batch: $(CORE)
	$(LUA) bench/batch.lua

# One login drains 1,000 and 100,000 queued messages, with and without XEP-0198, against the
# plugin of main before acknowledged delivery (bench/drain.lua)
bench-drain: $(CORE)
	$(LUA) bench/drain.lua $(BENCH_DRAIN_ARGS)

# Names chosen to collide under the tables' old unkeyed hash against random ones.
bench-hash: $(CORE)
	$(LUA) bench/hash_flood.lua

# Per-call latency of postgres (its own throwaway server on loopback) next to sqlite.
bench-postgres: $(CORE)
	$(LUA) bench/postgres_latency.lua

build/bench_core: bench/baseline.c
	@mkdir -p build
	$(CC) $(WARN) -O2 -o $@ $< $(SQLITE_CFLAGS) $(SQLITE_LIBS)

install: $(CORE)
	install -d $(DESTDIR)$(LIBDIR)/offline_store $(DESTDIR)$(LUADIR)/offline_store
	install -m 0755 $(CORE) $(DESTDIR)$(LIBDIR)/offline_store/core.so
	install -m 0644 lua/offline_store/*.lua $(DESTDIR)$(LUADIR)/offline_store/
	install -m 0644 lua/mod_offline.lua lua/mod_offline_stub.lua $(DESTDIR)$(LUADIR)/

clean:
	rm -rf build

# Differential fuzzing (spec/fuzz/fuzz_core.c): both backends against a model of the storage contract, under
# libFuzzer + ASan + UBSan; needs clang and libclang-rt-14-dev. One core for FUZZ_SECONDS; the
# corpus grows in build/fuzz/corpus (seeded from spec/fuzz/corpus); a failing input is saved as
# build/fuzz/crash-*; replay it with OFFLINE_STORE_FUZZ_TRACE=1 build/fuzz_core FILE. The sqlite
# backend is built with chunks of 7 rows, statements of 3 and an arena of 2 kB instead of 256, 32
# and 1 MB, so that the fuzzer's batches (up to 80 stores) write their rows in several chunks,
# and removes 3 ids per statement instead of 32.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 120
FUZZ_CFLAGS   = -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
                -DOS_SQLITE_CHUNK=7 -DOS_SQLITE_STMT_ROWS=3 -DOS_SQLITE_ARENA_KEEP=2048 -DOS_SQLITE_IDS_PER_STMT=3
FUZZ_SRC      = spec/fuzz/fuzz_core.c src/backend_sqlite.c src/backend_sqlite_batch.c src/backend_sqlite_schema.c src/backend_memory.c src/hash.c src/buffer.c

build/fuzz_core: $(FUZZ_SRC) $(HDR)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(WARN) $(FUZZ_CFLAGS) -Isrc $(SQLITE_CFLAGS) -o $@ $(FUZZ_SRC) $(SQLITE_LIBS)

fuzz: build/fuzz_core
	@mkdir -p build/fuzz/corpus
	@echo "fuzz: $(FUZZ_SECONDS) s, log in build/fuzz/fuzz.log"
	@UBSAN_OPTIONS=print_stacktrace=1 ./build/fuzz_core -max_total_time=$(FUZZ_SECONDS) \
	  -max_len=4096 -timeout=30 -print_final_stats=1 -artifact_prefix=build/fuzz/ \
	  build/fuzz/corpus spec/fuzz/corpus >build/fuzz/fuzz.log 2>&1; rc=$$?; \
	[ $$rc -eq 0 ] || tail -n 60 build/fuzz/fuzz.log; \
	grep -E '^#[0-9]+[[:space:]]+DONE' build/fuzz/fuzz.log | tail -n 1; \
	grep -E '^stat::(number_of_executed_units|average_exec_per_sec)' build/fuzz/fuzz.log; \
	exit $$rc

# End-to-end benchmark in a real Prosody against the bundled mod_offline (bench/e2e.lua):
# the N=20000 comparison (5 rounds, medians) of doc/performance.md. More options through
# BENCH_E2E_ARGS, e.g. BENCH_E2E_ARGS="--paired-scale" (the N=1,000,000 scale run) or
# BENCH_E2E_ARGS="--variants ours,stub -N 50000 --runs 1".
bench-e2e: deps deps-bench-e2e $(CORE)
	$(LUA) bench/e2e.lua $(BENCH_E2E_ARGS)

# N=2000, R=20, one run of every variant: under a minute.
bench-e2e-quick: deps deps-bench-e2e $(CORE)
	$(LUA) bench/e2e.lua --quick $(BENCH_E2E_ARGS)

# Issue 23's load (N=10000 to R=200) on a throwaway PostgreSQL with fsync on: ours on PostgreSQL,
# on one node and on two sharing the database, against ours on sqlite and the bundled mod_offline
# on mod_storage_sql/PostgreSQL; 5 rounds, medians of per-round ratios (doc/performance.md).
# Two checkouts: BENCH_E2E_ARGS="--variants ours,pg,sqlpg,pg@/path/to/other --baseline pg".
BENCH_E2E_POSTGRES_ARGS = --variants ours,pg,sqlpg --nodes 2 -N 10000 -R 200 --runs 5
bench-e2e-postgres: deps deps-bench-e2e $(CORE)
	$(LUA) bench/e2e.lua $(BENCH_E2E_POSTGRES_ARGS) $(BENCH_E2E_ARGS)

# The bundled mod_offline on storage = "sql" needs Debian's LuaDBI drivers: SQLite3 (variant sql)
# and PostgreSQL (variant sqlpg; only the bench needs it, not `make test`).
BENCH_E2E_DEBS = lua-dbi-sqlite3 lua-dbi-postgresql
deps-bench-e2e:
	@$(call install_missing,$(BENCH_E2E_DEBS))
