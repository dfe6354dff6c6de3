# The two commands: `make run` (dashboard + worker) and `make test` (the whole suite).
# Each creates .venv/ and installs requirements.lock (exact versions) on first use.
# `make lock` regenerates requirements.lock from the requirements*.txt ranges (docs/development.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.deps-installed
PORT   ?= 8501
HOST   ?= 127.0.0.1
# Worker processes per GPU (`make run PER_GPU=3`); empty: $$STUDIO_PER_GPU, else worker/launch.py's DEFAULT_PER_GPU (auto).
PER_GPU ?=

# The lock tool lives in its own venv (.tools/), never in .venv/ or the system.
PIP_VERSION := 26.3
UV_VERSION  := 0.13.9
TOOLS       := .tools
UV          := $(TOOLS)/bin/uv
UV_STAMP    := $(TOOLS)/.uv-$(UV_VERSION)
# `make lock` only sees releases uploaded before this moment, so it gives the same lock every
# time until this date or a requirements file changes. Move it forward to take newer releases.
LOCK_DATE   := 2026-11-29T00:00:00Z
LOCK_INPUTS := requirements.txt requirements-dev.txt requirements-ray.txt

.PHONY: run test lint lock bench clean

$(STAMP): requirements.lock requirements-nodeps.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet pip==$(PIP_VERSION)
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	@touch $@

run: $(STAMP)
	$(PY) -m worker.launch --host $(HOST) --port $(PORT) $(if $(PER_GPU),--per-gpu $(PER_GPU))

test: $(STAMP)
	@bash scripts/ensure_browser.sh
	@bash scripts/ensure_postgres.sh
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

# One universal lock for Python 3.10-3.13 (environment markers where versions differ).
lock: $(UV_STAMP)
	$(UV) pip compile --quiet --universal --python-version 3.10 --exclude-newer $(LOCK_DATE) \
		--custom-compile-command "make lock" $(LOCK_INPUTS) -o requirements.lock

$(UV_STAMP):
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	@touch $@

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache test-output
