# Fresh machine -> virtual environment with everything (the `test` extra: every feature and the test
# tools) -> run / test. `make core` checks the lean core install (`pip install .`, no extras) in a fresh,
# temporary environment (.ci/core_install.sh).
# TORCH pins the CPU build that this project's machines install from a local file; override it
# (e.g. `make install TORCH="torch==2.13.0 --index-url ..."`) for a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (0: one process). Each keeps torch's default thread count, so the
# paths that depend on it are tested as users run them; .ci/run adds a one-thread pass of -m numerics.
PYTEST_WORKERS ?= 2

.PHONY: install run test core smoke bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: install
	$(VENV)/bin/sharelora train

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

core:
	TORCH="$(TORCH)" bash .ci/core_install.sh

smoke: install
	$(PY) -m pytest -q -m smoke $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/sharelora bench

clean:
	rm -rf $(VENV) build *.egg-info
