# Two commands on a fresh machine: `make run` (the service) and `make test` (the suite).
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast lint format docs bench clean compose-test compose-clean lock

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,train,export]"
	touch $(STAMP)

# `make run CHARACTERS="nishikino_maki sakurauchi_riko"` tracks them first (they stay tracked for later runs);
# RUN_ARGS passes options on, e.g. RUN_ARGS=--verbose
CHARACTERS ?=
RUN_ARGS ?=

run: install
ifneq ($(strip $(CHARACTERS)),)
	$(VENV)/bin/waifu characters add $(CHARACTERS)
endif
	$(VENV)/bin/waifu run $(RUN_ARGS)

# TEST_WORKERS pytest-xdist processes share the tests (each its own Redis database, tests/support/env.py),
# a whole file to one worker, so a module's expensive fixture (the detection rates) is made once; the longest
# files first, in the order of the last run's times (tests/support/ordering.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# deploy/test-services.sh starts Redis and PostgreSQL when they are down and, as root, installs the Debian
# packages a few tests use; otherwise it says what is missing and which tests fail without it
test: install
	bash deploy/test-services.sh
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# the tests that start no process (Celery workers, `waifu run`, services, browsers): about 2 minutes
test-fast: install
	bash deploy/test-services.sh
	$(PY) -m pytest $(XDIST) -m "not processes" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# the README's configuration table, from core/settings.py's field descriptions (a test checks it)
docs: install
	$(PY) -m waifu.settings_table --write README.md

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m bench.collect
	$(PY) -m bench.collect --through crop --database both
	$(PY) -m bench.faces
	$(PY) -m bench.predict
	$(PY) -m bench.pipeline
	$(PY) -m bench.web
	$(PY) -m bench.stall_check
	$(PY) -m bench.web_predict
	$(PY) -m bench.export
	$(PY) -m bench.download_memory
	$(PY) -m bench.train_cost
	$(PY) -m bench.train --models classical-plain,classical,resnet,chosen --seeds 0,1 --folds 3

# the stack of docker-compose.yml built and run under podman with stand-in base images, checked end to end
# (deploy/compose_test.py); images stay as a cache, `make compose-clean` removes them
compose-test: install
	bash deploy/compose-test.sh

compose-clean:
	bash deploy/compose-clean.sh

# the exact versions (and hashes) the Docker image installs, from pyproject.toml; rerun after changing it
LOCK_FLAGS := --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-find-links --no-emit-index-url \
	--no-emit-trusted-host --extra train --extra flower
lock: install
	$(PY) -m pip install --quiet "pip-tools>=7.4,<8"
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) --output-file deploy/requirements.lock pyproject.toml deploy/requirements.in

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
