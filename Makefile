# fpolicyd — every target installs what it needs into .venv first (only python3, pip and make required; a C
# compiler is optional: with one, the install also builds the C accelerator, src/fpolicyd/_speedups.c).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck unit bench bench-replay bench-parts clean

# setup.py and the C source too: an edited accelerator is rebuilt (the editable install compiles it in place).
$(STAMP): pyproject.toml setup.py src/fpolicyd/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the daemon on its embedded default: 0.0.0.0:9898, JSON Lines under ./fpolicyd-data/events.
run: $(STAMP)
	$(BIN)/fpolicyd serve

## The whole suite, exactly what CI runs: lint, format check, mypy --strict, pytest (warnings are errors).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/property

## Issue 11's speed goals, one table from one run (~6 min on 2 cores): events/s, server CPU per event (whole process
## tree), requests and billed chunks per event, peak RSS for JSON Lines, SQS, packed SQS and EventBridge (defaults and
## dedup off) against a bare frame splitter; p50/p95/p99 frame -> durable and frame -> SQS at 20,000 events/s.
## `--quick` for a smoke run, `--json FILE` for the figures: $(BIN)/python benchmarks/bench_throughput.py --help
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_throughput.py

## Issue 11's replay storm (~2 min): fpolicyd replay-test --events 1000000 --nodes 4 --duplicates 0.01 --shuffle
## --subprocess; wall time and events lost.
bench-replay: $(STAMP)
	$(BIN)/python benchmarks/bench_throughput.py --replay-only

## Where the time goes, in process: codec steps per event, what SQS packing bills.
bench-parts: $(STAMP)
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_ingest_step.py
	$(BIN)/python benchmarks/bench_sqs_pack.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis fpolicyd-data build src/fpolicyd/*.so
