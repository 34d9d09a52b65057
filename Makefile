# p2pd — seed registry + node agent. `make demo` and `make test` work on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PACKAGES := docker-registry skopeo containerd umoci busybox-static curl iproute2 nftables podman slapd ldap-utils apache2-utils gnupg gpgv
STAMP := $(VENV)/.installed

.PHONY: venv install system-deps test test-fast test-loaded lint demo bench bench-seed bench-p2pd bench-chunks bench-chunk-cpu bench-scan clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q -e '.[test,dev]'
	touch $(STAMP)

venv install: $(STAMP)

# Debian packages the tests drive for real; installed only when root and missing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "warning: not root, cannot install:$$missing (tests that need them will skip, or fail with CI=true)"; fi

test: install system-deps
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

# The whole suite beside a busy loop on one core: a slower (CI) machine's timing, to find the
# tests that only pass on an idle one. Before a change to timeouts, pacing or event ordering.
test-loaded: install system-deps
	@$(PY) -c 'while True: pass' & hog=$$!; trap "kill $$hog" EXIT; $(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check p2pd seed tests
	$(VENV)/bin/mypy

demo: install system-deps
	$(PY) -m tests.demo

bench: bench-seed bench-p2pd bench-p2pd-auth bench-chunks bench-chunk-cpu bench-scan bench-signatures bench-swarm bench-preheat

bench-seed: install system-deps
	$(PY) -m tests.bench.seed_throughput --out docs/benchmarks.md

bench-p2pd: install system-deps
	$(PY) -m tests.bench.p2pd_pull --out docs/benchmarks.md

# Client authorization at the node: pull time with each client's token checked vs an open
# namespace, and the cost of one decision (~1 min; tiny version in tests/test_p2pd_auth_bench.py).
bench-p2pd-auth: install system-deps
	$(PY) -m tests.bench.p2pd_auth --out docs/benchmarks.md

# An agent's CPU per MiB taking a blob from one peer on loopback, by chunk size and chunk count,
# and from a sender paced like a slow link (~6 min with the default 3 repetitions; tiny version
# in tests/test_chunk_cpu_bench.py).
bench-chunk-cpu: install system-deps
	$(PY) -m tests.bench.chunk_cpu --out docs/benchmarks.md

# The scanner: MiB/s of compressed layer (per core) on a 256 MiB image built from this machine's
# files, and p99 of concurrent blob pulls while a scan runs vs idle (~4 min).
bench-scan: install system-deps
	$(PY) -m tests.bench.scan --out docs/benchmarks.md

# The [[signatures]] pull policy: manifest pull latency of a signed tag, policy on vs off, warm and
# cold (gpgv) (< 1 min; its tiny version runs in tests/test_seed_signatures_bench.py).
bench-signatures: install system-deps
	$(PY) -m tests.bench.signatures --out docs/benchmarks.md

# Swarm chunk size: seed + 5 agents on 127.0.0.x, one 128 MiB blob, 256 KiB..16 MiB (< 8 min).
bench-chunks: install
	$(PY) -m tests.bench.chunk_size --out docs/benchmarks.md

# The bench extra (matplotlib, for plots) on top of test and dev.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e '.[test,dev,bench]'
	touch $(BENCH_STAMP)

install-bench: $(BENCH_STAMP)

# One image to N nodes on a network-namespace testbed with tc-shaped links: direct vs site cache vs
# p2pd vs the Kumar-Ross bound; N = 16 and N = 8 with ctr, then the weak-regime matrix (node/seed
# link 1, 2, 10 x N = 8, 16, 32; p2pd only); table, plots and raw JSON (root, ~35 min).
# The benchmark stops itself after 42 min; timeout's SIGTERM (handled like Ctrl-C: full teardown) is a backstop.
bench-swarm: install-bench system-deps
	timeout --foreground --signal=TERM --kill-after=60 2700 $(PY) -m tests.bench.swarm --out docs/benchmarks.md \
		--deadline-s 2550

# p2pd preheat of a 200 MiB layer to 8 nodes on the namespace testbed, then a rollout pull that must send
# nothing upstream (a few minutes; tiny version in tests/test_preheat_bench.py).
bench-preheat: install system-deps
	timeout --foreground --signal=TERM --kill-after=60 600 $(PY) -m tests.bench.preheat --nodes 8 --layer-mib 200 \
		--seed-mbit 50 --node-mbit 200 --json docs/bench/preheat.json

.PHONY: bench-preheat install-bench bench-swarm bench-p2pd-auth bench-scan bench-signatures bench-signatures

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
