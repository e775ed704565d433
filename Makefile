# Every target creates what it needs; `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The declared minimum versions, tested in a second environment (route resolution differs).
MIN_PYTHON ?= $(shell (python3.10 -c '' 2>/dev/null && echo python3.10) \
	|| ls $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.10*/bin/python3.10 2>/dev/null | tail -n 1 \
	|| echo $(PYTHON))
MIN_VENV ?= .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_PINS := fastapi==0.115.0 starlette==0.37.2 prometheus-client==0.20.0 structlog==23.1.0 \
	httpx==0.27.2 anyio==4.4.0 pytest==8.3.3 pytest-asyncio==0.24.0
MIN_TESTS := tests/test_routes.py tests/test_middleware.py tests/test_endpoint.py \
	tests/test_custom_labels.py \
	tests/test_config.py tests/test_public_api.py
PYTEST_ARGS ?=

.PHONY: help install test test-latest test-min lint demo bench bench-smoke soak clean

help:
	@echo "make demo        run the example app on a throwaway PostgreSQL, drive traffic, summarise"
	@echo "make test        the full test suite (newest dependencies + the declared minimums)"
	@echo "make lint        ruff and mypy strict"
	@echo "make bench       overhead against a bare app and the peers"
	@echo "make soak        10 minutes of mixed and hostile traffic: RSS and series stay flat"

$(PY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,bench]"
	@touch $(PY)

install: $(PY)

$(MIN_PY): Makefile
	$(MIN_PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q --upgrade pip
	$(MIN_PY) -m pip install -q $(MIN_PINS)
	$(MIN_PY) -m pip install -q --no-deps -e .
	@touch $(MIN_PY)

test: test-latest test-min

test-latest: $(PY)
	$(PY) -m pytest $(PYTEST_ARGS)

test-min: $(MIN_PY)
	$(MIN_PY) -m pytest -p no:cacheprovider -o addopts="-rfEs" \
		-W "ignore::pytest.PytestUnraisableExceptionWarning" $(MIN_TESTS)

lint: $(PY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

demo: $(PY)
	$(PY) -m example_app.demo

bench: $(PY)
	$(PY) -m benchmarks

bench-smoke: $(PY)
	$(PY) -m benchmarks --smoke

SOAK_SECONDS ?= 600
soak: $(PY)
	$(PY) -m benchmarks --only soak --soak-seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) $(MIN_VENV) .mypy_cache .ruff_cache .pytest_cache
