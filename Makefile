# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint typecheck bench manifests docs docs-serve docs-screenshots clean

$(STAMP): pyproject.toml conveyor_driver/_version.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Every test, and the library's coverage: the lines each file misses (full files left out).
# Then the runtime's in-process tests again on uvloop (the drivers that process tests
# start run on it already: --loop auto).
UVLOOP_TESTS := tests/test_runtime.py tests/test_settlement.py tests/test_publisher.py \
	tests/test_ledger.py tests/test_consumer_resilience.py tests/test_deadlines.py \
	tests/test_nats_logs.py tests/test_testing_serve.py tests/test_loops.py
test: lint typecheck
	$(BIN)/pytest -q --cov=conveyor_driver --cov-report=term-missing:skip-covered
	$(BIN)/pytest -q --event-loop uvloop -m "not process and not slow" $(UVLOOP_TESTS)

# The edit-run loop: no child Pythons and no package builds (markers: see tests/conftest.py).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not process and not slow"

# The documentation site (mkdocs.yml) into site/, strictly: a broken link, a missing reference
# or a docstring mkdocstrings cannot read fails it. `make test` builds it too
# (tests/test_docs_site.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

# The home page, the tutorial and the API reference as Debian's chromium shows them, into
# /tmp/docs-screenshots/ (tools/screenshots.py; needs /usr/bin/chromium, which .ci/run installs).
docs-screenshots: docs
	$(BIN)/python tools/screenshots.py --site site --out /tmp/docs-screenshots

bench: $(STAMP)
	$(BIN)/python bench/bench_dispatch.py
	$(BIN)/python bench/bench_startup.py
	$(BIN)/python bench/bench_logs.py
	$(BIN)/python bench/bench_telemetry.py
	$(BIN)/python bench/bench_workers.py

# deploy/k8s is the manifest command's output for the example driver (tests/test_deploy.py
# checks it is current): rewrite it after changing the command or the example. No CONVEYOR_*
# variable of this shell may change it.
EXAMPLE := examples/command_runner.py:driver
manifests: $(STAMP)
	env -i $(BIN)/conveyor-driver manifest $(EXAMPLE) > deploy/k8s/deployment.yaml
	env -i $(BIN)/conveyor-driver manifest $(EXAMPLE) --scaled-job > deploy/k8s/scaled-job.yaml

clean:
	rm -rf $(VENV) site .mypy_cache .pytest_cache .ruff_cache .coverage .coverage.* build *.egg-info
