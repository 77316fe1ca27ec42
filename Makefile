# The two commands a newcomer needs: `make run` (a full optimization on the embedded model)
# and `make test`. Everything else is installed by them.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STUDY  ?= promptopt_dagster/examples/sentiment.yaml

.PHONY: run test ui lint bench install clean browser postgres redis

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,workers]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/promptopt run $(STUDY)

# Debian's chromium for the browser tests (Playwright drives it; it downloads no browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y chromium; }

# Debian's PostgreSQL server binaries for the Postgres-backed tests: support/postgres.py starts its
# own throwaway server (temporary folder, free port), never a Debian cluster. The createcluster.d
# file stops apt from creating (and starting) the default "main" cluster on port 5432.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO mkdir -p /etc/postgresql-common/createcluster.d && \
	  echo 'create_main_cluster = false' \
	    | $$SUDO tee /etc/postgresql-common/createcluster.d/promptopt-no-main-cluster.conf >/dev/null && \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }

# Debian's Redis server for the Celery tests: support/redis_server.py starts its own on a free port
# in a temporary folder. apt may start the packaged service where systemd runs; no test uses it.
redis:
	@command -v redis-server >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; }

test: install browser postgres redis
	$(BIN)/ruff check promptopt_dagster promptopt_dagster_tests benchmarks
	$(BIN)/pytest

ui: install
	$(BIN)/promptopt ui

bench: install
	$(BIN)/python benchmarks/orchestration_overhead.py

clean:
	rm -rf .promptopt .pytest_cache
