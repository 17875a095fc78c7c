# Everything runs from a virtual environment built from the pinned requirements.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run try test lint unit sandbox proxy postgres hashes demo check-config replay send bench bench-fanout profile chaos clean

# The runtime environment (what the Dockerfile installs), and the dev tools on top of it. Every
# file pip may take is pinned by its sha256 (`make hashes` writes them); pip refuses anything else.
$(BIN)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.txt
	touch $@

$(BIN)/.dev: $(BIN)/.runtime requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.txt
	touch $@

## run: start the service the way the container does (needs STRIPE_API_KEY, OPENMETER_WEBHOOK_SECRET)
run: $(BIN)/.runtime
	PATH="$(CURDIR)/$(BIN):$$PATH" exec gunicorn --config gunicorn.conf.py

## try: the fake Stripe (port 12111) and the service (port 8080) together, to try by hand; Ctrl-C stops both
try: $(BIN)/.dev
	$(BIN)/python -m tools.try_it

## test: lint, then the whole test suite
test: lint unit

unit: $(BIN)/.dev sandbox proxy postgres
	$(BIN)/python -m pytest

# tests/test_container.py runs the container's CMD under bubblewrap with a read-only root. It is
# installed where that is possible (root with apt-get, as in CI); elsewhere that test skips.
sandbox:
	@command -v bwrap >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && sh tools/apt-install.sh bubblewrap; } \
	  || echo "bubblewrap is not installed: the read-only-root container test will skip"

# tests/test_proxy.py runs nginx with docs/nginx.conf in front of gunicorn, over TLS with a certificate
# openssl makes. Both are installed the same way (root with apt-get); elsewhere those tests skip.
proxy:
	@{ command -v nginx || [ -x /usr/sbin/nginx ]; } >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && sh tools/apt-install.sh nginx openssl; } \
	  || echo "nginx or openssl is not installed: the reverse-proxy tests will skip"

# The PostgreSQL ledger's tests (DATABASE_URL, several replicas) run a throw-away server that
# tests/postgres.py starts with initdb in a temporary folder. Debian's postgresql is installed the
# same way (root with apt-get); elsewhere those tests skip.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && sh tools/apt-install.sh postgresql; } \
	  || echo "PostgreSQL is not installed: the PostgreSQL ledger's tests will skip"

## lint: ruff (lint + format), mypy, hadolint
lint: $(BIN)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

## hashes: after changing a pin, write the sha256 of every file of each pinned release (from PyPI)
hashes:
	$(PYTHON) tools/hash_requirements.py requirements.txt requirements-dev.txt

## check-config: validate $(CONFIG_PATH) (default config.yaml) offline; ARGS=--online asks Stripe too
check-config: $(BIN)/.runtime
	$(BIN)/flask --app app check-config $(ARGS)

## replay: push a saved report through the webhook's path (FILE=report.json; ARGS=--dry-run)
replay: $(BIN)/.runtime
	$(BIN)/flask --app app replay $(FILE) $(ARGS)

## send: sign FILE with $$OPENMETER_WEBHOOK_SECRET and post it to a running service (URL=...)
send: $(BIN)/.runtime
	$(BIN)/python tools/send.py $(FILE) --url $(or $(URL),http://127.0.0.1:8080/webhook) $(ARGS)

## demo: the service against a local fake Stripe, one signed example report, and what landed
demo: $(BIN)/.dev
	$(BIN)/python -m tools.demo

## bench: the full benchmark (several minutes); bench/run.py --help for options
bench: $(BIN)/.dev
	$(BIN)/python -m bench.run

## bench-fanout: month-end fan-out against a rate-limited fake Stripe, R=25 and 100/s (~6 min)
bench-fanout: $(BIN)/.dev
	$(BIN)/python -m bench.fanout $(ARGS)

## profile: where a loaded service's CPU goes (py-spy over a 32-sender run; ~1 min, as root)
profile: $(BIN)/.dev
	$(BIN)/python -m bench.profile

## chaos: Svix-like delivery to two replicas on one PostgreSQL while Stripe faults and workers are SIGKILLed (~3 min)
chaos: $(BIN)/.dev postgres
	$(BIN)/python -m bench.chaos --replicas 2

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
