# The two commands: `make run` (dashboard + worker) and `make test` (the whole suite).
# Each creates .venv/ and installs what it needs on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
PORT   ?= 8501
HOST   ?= 127.0.0.1

.PHONY: run test lint bench clean

$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt requirements-ray.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -r requirements-ray.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	@touch $@

run: $(STAMP)
	$(PY) -m worker.launch --host $(HOST) --port $(PORT)

test: $(STAMP)
	@bash scripts/ensure_browser.sh
	@bash scripts/ensure_postgres.sh
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-output
