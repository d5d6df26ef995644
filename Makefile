# Each target sets itself up: a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.toml
STAMP  := $(VENV)/.installed

.PHONY: run test check check-systemd lint types bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ferry run -c $(CONFIG)

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check daemon actors tests bench
	$(BIN)/ruff format --check daemon actors tests bench

types: $(STAMP)
	$(BIN)/mypy

# Verifies the systemd units and prints their security exposure; skips without systemd-analyze.
check-systemd: $(STAMP)
	VENV=$(VENV) systemd/check.sh

check: lint types test check-systemd

# Full-size reliability scenarios (tests/chaos; short versions run in `make test`): kill -9 loop,
# long sink outage. Bounded in count and time, traffic to 127.0.0.1 only; takes tens of minutes.
chaos: $(STAMP)
	FERRY_CHAOS=full $(BIN)/pytest -q -s -p no:cacheprovider -o timeout=7200 tests/chaos

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var/*.db* var/*.jsonl
