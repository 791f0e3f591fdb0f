PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow test-all lint run clean dashboard-screenshot bench-forgetting bench-teach bench bench-speed bench-scaling bench-serving bench-replicas bench-parallel bench-forget

# One command sets everything up: a virtual environment with torch (CPU wheel unless you have
# installed another build) and llmos with its test tools (among them the openai client and
# playwright's Python client), and Debian's chromium for the dashboard test when it is missing
# and apt-get can be run (as root). Playwright's own browser download is never used.
install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y --no-install-recommends chromium || \
		{ apt-get update && apt-get install -y --no-install-recommends chromium; }; \
	else echo "note: /usr/bin/chromium is missing and apt-get cannot run here; the dashboard test needs it" >&2; fi

# Fast tier: unit and end-to-end tests (435 tests: 5.5-7.5 min on 2 cores).
test:
	$(BIN)/python -m pytest -m "not slow" -q

# The slow tier: crash loops, fuzzing, load, the soak, replicas, torchrun, forgetting (34 tests, 29 to 39 min on
# 2 cores; CI runs it after `make test`, 36 to 51 minutes in all, by machine); -rP prints what each passing test reports (the load and
# soak figures).
test-slow:
	$(BIN)/python -m pytest -m "slow" -q -rP

# Both tiers. The store tests also run on PostgreSQL when LLMOS_TEST_POSTGRES_URL is set.
test-all: test test-slow

# Refresh README's picture of the dashboard (the browser test, its screenshot kept).
dashboard-screenshot:
	LLMOS_DASHBOARD_SCREENSHOT=docs/dashboard.png $(BIN)/python -m pytest -q tests/test_dashboard.py

lint:
	$(BIN)/ruff check llmos tests
	$(BIN)/mypy llmos

run:
	$(BIN)/llmos serve

clean:
	rm -rf llmos-data .pytest_cache

# Forgetting of an earlier domain while a new one streams in, per mitigation strategy (< 5 min, CPU).
bench-forgetting:
	$(BIN)/python bench/forgetting.py --out bench/results

# What llmos learns of what users teach, per strategy, against the defaults of the commit before
# this design (bench/results/teach.md; ~10 min, CPU).
TEACH_BASELINE ?= d2922fd

bench-teach:
	$(BIN)/python bench/teach.py --out bench/results --baseline $(TEACH_BASELINE)

# Serving under load, figure 10: batched decoding against static-batch generate and transformers'
# continuous batching, token gaps while a long prompt arrives (bench/results/serving.md; ~4 min, CPU).
bench-serving:
	$(BIN)/python bench/serving.py --out bench/results

# Promotion to served across API replicas (two `serve --role api`, one `llmos train`), on
# PostgreSQL (the service at 127.0.0.1:5432) and SQLite: bench/results/replicas.md.
bench-replicas:
	$(BIN)/python bench/replicas.py --out bench/results/replicas.md

# Data-parallel training (the optimize stage on 2 gloo ranks against one process):
# bench/results/parallel.md.
bench-parallel:
	$(BIN)/python bench/parallel.py --out bench/results/parallel.md

# Forgetting on request: time to forget against what was trained since the forgotten text, and
# the served answers it changes (bench/results/forget.md).
bench-forget:
	$(BIN)/python bench/forget.py --out bench/results

# Speed (issue 4): trainer, generation, serving while training, hot-swap, freshness, ingest, and
# their growth with model size, each as a ratio against a reference measured side by side in the
# same run; writes bench/results/RESULTS.md (10 to 31 minutes on 2 cores, by machine).
bench: bench-speed bench-scaling
	$(BIN)/python bench/report.py --results bench/results --command "make bench"

# The commit before issue 4's speed work: figures 7 and 8 measure its server too, for before/after.
BENCH_BASELINE ?= 233d075

bench-speed:
	$(BIN)/python bench/speed.py --out bench/results --baseline $(BENCH_BASELINE)

bench-scaling:
	$(BIN)/python bench/scaling.py --out bench/results
