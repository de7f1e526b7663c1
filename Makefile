# The two commands of the README:
#   make demo   install, embedded PostgreSQL + demo data, Phase 1, Phase 2 under the app workload (again: no change)
#   make test   install, lint, unit + integration tests on a real PostgreSQL, Molecule scenarios
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -euo pipefail -c
VENV := .venv/bin
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PG_EMBED_PORT ?= 55432
DEMO_CALLS ?= 200000

.PHONY: install install-test demo demo-stop lint unit molecule test-matrix test clean ee

install:
	scripts/install.sh

install-test:
	scripts/install.sh --test

demo: install
	DEMO_CALLS=$(DEMO_CALLS) scripts/demo.sh

demo-stop:
	scripts/pg_embedded.sh stop

lint: install-test
	$(VENV)/yamllint -s .
	$(VENV)/ansible-lint
	$(VENV)/squawk files/sql/0*.sql files/sql/rollback/*.sql files/sql/repeatable/*/*.sql files/sql/rollback/repeatable/*/*.sql
# Each role's own SQL (roles/*/files): psycopg2 placeholders %(name)s become NULL (%% becomes %) so squawk can parse it.
	find roles -path 'roles/*/files/*.sql' | sort | while read -r f; do sed -E 's/%\(([a-z_]+)\)s/NULL/g; s/%%/%/g' "$$f" | $(VENV)/squawk --reporter gcc --stdin-filepath "$$f"; done

# Test files run on $(PYTEST_WORKERS) workers, each file whole on one worker (module fixtures, stages
# in file order), each worker with its own PostgreSQL server. PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 2
# tests/test_awx_ee_run.py: in make test, the AWX job runs in the image `make ee` built (skipped when
# it is not built; SCANNER_EE_BUILD=1 builds it first, several minutes the first time).
export SCANNER_EE_BUILD ?= 0
unit: install-test
	mkdir -p .cache
	$(VENV)/pytest -n $(PYTEST_WORKERS) --dist loadfile --junitxml=.cache/pytest-junit.xml

molecule: install-test
	scripts/molecule.sh

# The invariant test of issue 18 (tests/test_integrity_fuzz.py, docs/TESTING.md "Invariant test"), on
# other seeds and for longer than in make test: make test-fuzz SEEDS="1 2 3" FUZZ_SECONDS=120
# (FUZZ_SECONDS: the walk's dwell budget per seed, a seed takes about 3x that; FUZZ_SCALE: demo calls
# = 500 x scale; FUZZ_THREADS: sessions). Journals of committed transactions: .cache/fuzz/.
SEEDS ?= 1 2 3
FUZZ_SECONDS ?= 60
FUZZ_SCALE ?= 1
FUZZ_THREADS ?= 4
.PHONY: test-fuzz
test-fuzz: install-test
	mkdir -p .cache/fuzz
	FUZZ_SEEDS="$(SEEDS)" FUZZ_SECONDS="$(FUZZ_SECONDS)" FUZZ_SCALE="$(FUZZ_SCALE)" FUZZ_THREADS="$(FUZZ_THREADS)" \
		FUZZ_JOURNAL_DIR="$(CURDIR)/.cache/fuzz" \
		$(VENV)/pytest tests/test_integrity_fuzz.py -n 0 -s -rA -k test_fuzz_conversion_invariants

# The integrity tests of issue 18 (case by case and the invariant test, seeds $(SEEDS)) on other
# majors, each test server in a container of the matrix image (conftest.py: SCANNER_TEST_PG_MAJOR;
# root + podman + debootstrap): PostgreSQL 13 marks partition trigger clones internal, 17 is the newest
# the matrix of make test runs.
INTEGRITY_MAJORS ?= 13 17
.PHONY: test-integrity-majors
test-integrity-majors: install-test
	for m in $(INTEGRITY_MAJORS); do
		echo "== integrity tests on PostgreSQL $$m"
		SCANNER_TEST_PG_MAJOR=$$m FUZZ_SEEDS="$(SEEDS)" $(VENV)/pytest -n 0 -rfE \
			tests/test_integrity.py tests/test_integrity_daily.py tests/test_integrity_fuzz.py
	done

# The AWX execution environment: localhost/scanner-dbops-ee:<tag> (docs/AWX.md). Needs root, podman, debootstrap.
ee: install-test
	scripts/build_ee.sh

# Every phase on PostgreSQL 13, 15, 17 and 18 (molecule/matrix; root + podman + debootstrap).
MATRIX_MAJORS ?= 13 15 17 18
test-matrix: install-test
	MATRIX_MAJORS="$(MATRIX_MAJORS)" scripts/molecule.sh matrix

test: install-test
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory unit
	$(MAKE) --no-print-directory molecule
	$(VENV)/python scripts/test_summary.py .cache/pytest-junit.xml

clean:
	scripts/pg_embedded.sh destroy || true
	rm -rf backups reports .cache
