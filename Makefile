# make run  - set up, start the emulators and the service on http://127.0.0.1:8080
#             (SERVER=uvicorn or SERVER=granian instead of Hypercorn)
# make test - set up and run the whole test suite (it starts its own emulators; as root it
#             installs Debian's chromium first when missing, for the console's browser tests)
# make lint - ruff (lint and format) and mypy --strict
# make test-py313 - the whole suite under Python 3.13 (a Debian 13 root; needs root)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-py313 lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

SERVER ?= hypercorn
# The suite runs in two processes (pytest-xdist), a test file each at a time: its tests mostly
# wait on servers and emulators. PYTEST_ARGS= runs it in one.
PYTEST_ARGS ?= -n 2 --dist loadfile

run: $(STAMP)
	SERVER=$(SERVER) $(BIN)/python -m devtools.run

# The console's tests drive Debian's chromium (installed here when missing and run as root).
test: $(STAMP)
	@test -x /usr/bin/chromium || (test "$$(id -u)" = 0 && DEBIAN_FRONTEND=noninteractive \
		sh -c 'apt-get update -qq && apt-get install -y -qq chromium >/dev/null') \
		|| echo "chromium is missing, and the console's tests fail without it:" \
			"install Debian's chromium: apt-get install -y chromium"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole suite under Python 3.13, in a Debian 13 root built once with debootstrap (needs root;
# cached in /var/cache/loopgate/py313-root, outside the repository).
test-py313:
	bash .ci/py313.sh $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check service tests bench devtools
	$(BIN)/ruff format --check service tests bench devtools
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.publish

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
