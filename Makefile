# Each target sets itself up: a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.toml
STAMP  := $(VENV)/.installed

.PHONY: run test deep check check-systemd lint types imports bench chaos clean wheel deb container-tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ferry run -c $(CONFIG)

# Two workers (pytest-xdist): most tests wait on a daemon process, so two at a time roughly halve
# the wall time on two cores. Every test takes its ports from free_port() and its files from tmp
# dirs, so they do not collide. WORKERS=0 runs it in one process.
WORKERS ?= 2
test: $(STAMP) container-tools
	$(BIN)/pytest -q -p no:cacheprovider -n $(WORKERS)

# What tests/debian needs to build the package and boot a Debian 12 container with systemd-nspawn:
# installed with apt-get when missing and we are root (CI is); otherwise those tests skip and say why.
CONTAINER_TOOLS := systemd-nspawn:systemd-container debootstrap:debootstrap dpkg-deb:dpkg nsenter:util-linux
container-tools:
	@missing=$$(for pair in $(CONTAINER_TOOLS); do command -v $${pair%%:*} >/dev/null || echo $${pair#*:}; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "installing $$missing"; \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing \
	            || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; }; \
	    else \
	        echo "container-tools: missing $$missing (not root or no apt-get): tests/debian will skip"; \
	    fi; \
	fi

# The property tests (hypothesis, schemathesis) with 25 times their CI-sized example counts.
deep: $(STAMP)
	FERRY_HYPOTHESIS=deep $(BIN)/pytest -q -p no:cacheprovider -n $(WORKERS) -k "properties or openapi"

lint: $(STAMP)
	$(BIN)/ruff check daemon actors tests bench debian
	$(BIN)/ruff format --check daemon actors tests bench debian

types: $(STAMP)
	$(BIN)/mypy

# The architecture's rules (docs/architecture.md, "Layout"): the import contract in pyproject.toml
# (import-linter), no import cycle between modules, no SQL outside daemon/store/.
imports: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -q -p no:cacheprovider -n 0 tests/test_architecture.py

# Verifies the systemd units and prints their security exposure; skips without systemd-analyze.
check-systemd: $(STAMP)
	VENV=$(VENV) systemd/check.sh

check: lint types imports test check-systemd

# Full-size reliability scenarios (tests/chaos; short versions run in `make test`): kill -9 loop,
# long sink outage. Bounded in count and time, traffic to 127.0.0.1 only; takes tens of minutes.
chaos: $(STAMP)
	FERRY_CHAOS=full $(BIN)/pytest -q -s -p no:cacheprovider -o timeout=7200 tests/chaos

bench: $(STAMP)
	$(BIN)/python -m bench

# The wheel, for `pipx install dist/ferry-*.whl`. setuptools never deletes what it copied into
# build/lib, so a module moved or removed since the last build would ship in the wheel: start clean.
wheel: $(STAMP)
	rm -rf dist/ferry-*.whl build/lib build/bdist.*
	$(BIN)/python -m build --wheel --outdir dist .

# The Debian package dist/ferry_VERSION_ARCH.deb (debian/build.py says how and why); needs dpkg-deb.
deb: wheel
	$(BIN)/python debian/build.py dist/ferry-*.whl

clean:
	rm -rf $(VENV) var/*.db* var/*.jsonl build dist
