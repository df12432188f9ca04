# scoremesh — everything goes through the project's own virtualenv, pinned by constraints.txt.
PYTHON ?= python3
# test processes (pytest-xdist, a file's tests together): each starts its own embedded
# broker and Redis. Two by default: on a 2-core machine the suite takes ~10 instead of
# ~20 min serially. The closed-loop tests stream until the promotion (or a deadline), not
# a count of events, so they hold with another test's services on the same cores.
# `make test TEST_WORKERS=0` runs serially
TEST_WORKERS ?= 2
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint format typecheck lock bench clean dev-up dev-down audit

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ./client -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## the main demo on the embedded stack
demo: install
	$(BIN)/scoremesh demo

## lint, types, then every test (unit, contract, integration, e2e)
test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff check services client tests scripts examples
	$(BIN)/ruff format --check services client tests scripts examples
	$(BIN)/mypy

format: install
	$(BIN)/ruff format services client tests scripts examples
	$(BIN)/ruff check --fix services client tests scripts examples

## re-pin every dependency after changing pyproject.toml
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install --quiet -e '.[dev]'
	.lockenv/bin/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt
	rm -rf .lockenv

## known vulnerabilities in the locked dependencies (pip-audit if installed, PyPI, OSV);
## fails only on a finding, says so plainly when no database is reachable
audit: install
	$(BIN)/python scripts/audit_deps.py

bench: install
	$(BIN)/python scripts/bench_pipeline.py

dev-up: install
	$(BIN)/scoremesh dev up

dev-down: install
	$(BIN)/scoremesh dev down

clean:
	rm -rf $(VENV) demo-output bench-results .pytest_cache .mypy_cache .ruff_cache
