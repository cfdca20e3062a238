# The two commands:  make run  (whole pipeline on the embedded default, Serve left answering)
#                    make test (lint + the whole test suite)
# Both create or update the virtualenv first (scripts/setup_venv.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
RAY := $(VENV)/bin/ray
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test lint stop

setup:
	@bash scripts/setup_venv.sh

run: setup
	@$(RAY) status >/dev/null 2>&1 || $(RAY) start --head --disable-usage-stats
	RAY_ADDRESS=auto $(PY) jobs/full_pipeline.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	@bash scripts/setup_browser.sh   # headless chromium for the playground test
	$(VENV)/bin/pytest $(PYTEST_ARGS)

stop:
	$(RAY) stop
