# Everything runs from a virtual environment built from the pinned requirements.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint unit demo check-config bench clean

# The runtime environment (what the Dockerfile installs), and the dev tools on top of it.
$(BIN)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(BIN)/.dev: $(BIN)/.runtime requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

## run: start the service the way the container does (needs STRIPE_API_KEY, OPENMETER_WEBHOOK_SECRET)
run: $(BIN)/.runtime
	PATH="$(CURDIR)/$(BIN):$$PATH" exec gunicorn --config gunicorn.conf.py

## test: lint, then the whole test suite
test: lint unit

unit: $(BIN)/.dev
	$(BIN)/python -m pytest

## lint: ruff (lint + format), mypy, hadolint
lint: $(BIN)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

## check-config: validate $(CONFIG_PATH) (default config.yaml) offline; ARGS=--online asks Stripe too
check-config: $(BIN)/.runtime
	$(BIN)/flask --app app check-config $(ARGS)

## demo: the service against a local fake Stripe, one signed example report, and what landed
demo: $(BIN)/.dev
	$(BIN)/python -m tests.demo

## bench: the full benchmark (several minutes); bench/run.py --help for options
bench: $(BIN)/.dev
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
