PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all lint run clean

# One command sets everything up: a virtual environment with torch (CPU wheel unless you have
# installed another build) and llmos with its test tools.
install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"

# Fast tier: unit and end-to-end tests (a few minutes on 2 cores).
test:
	$(BIN)/python -m pytest -m "not slow and not postgres" -q

# Everything, including the slow tier (crash loops) and PostgreSQL when LLMOS_TEST_POSTGRES_URL is set.
test-all:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check llmos tests
	$(BIN)/mypy llmos

run:
	$(BIN)/llmos serve

clean:
	rm -rf llmos-data .pytest_cache
