# fpolicyd — every target installs what it needs into .venv first (only python3, pip and make required; a C
# compiler is optional: with one, the install also builds the C accelerator, src/fpolicyd/_speedups.c).
#
# Installs come from the lock files, never from pyproject.toml's ranges, so that CI does not change when a
# dependency releases; pip checks every file it downloads against the lock's hashes (--require-hashes):
#   requirements.lock        the runtime dependencies (make run, and the Docker image)
#   requirements-dev.lock    those + the dev extra (make test and the other targets; the same runtime versions)
#   requirements-build.lock  the build backend (setuptools), installed into the venv because the project itself is
#                            installed without build isolation (pip would otherwise fetch an unpinned setuptools)
# After editing the dependencies of pyproject.toml:  make lock   (the one command that regenerates all three; it
# keeps the current pins where pyproject.toml still admits them).  make lock UPGRADE=1  moves every pin to the
# newest release. tests/unit/test_lock.py fails while pyproject.toml and the lock files disagree.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check
# Two stamps, one venv: `make run` installs the runtime lock only, the dev targets the dev lock. The dev lock holds
# every runtime pin at the same version, so a dev install is a runtime install too (its recipe touches both stamps)
# and `make run` after `make test` installs nothing; `make test` after `make run` adds the dev packages.
RUN_STAMP := $(VENV)/.run-stamp
DEV_STAMP := $(VENV)/.dev-stamp
# setup.py and the C source too: an edited accelerator is rebuilt (the editable install compiles it in place).
PROJECT := pyproject.toml setup.py src/fpolicyd/_speedups.c requirements-build.lock

.PHONY: install install-runtime lock run test lint typecheck unit bench bench-replay bench-parts bench-all fuzz clean pre-commit-install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# $(1): the lock file. The build backend and the dependencies, hash-checked; then fpolicyd itself, editable,
# without dependencies and without build isolation (so with the locked setuptools); then pip check, which fails
# when pyproject.toml asks for something the lock does not hold.
define install_locked
	$(PIP) install --quiet --require-hashes -r requirements-build.lock -r $(1)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PIP) check || { echo "pyproject.toml and the lock files disagree (make lock), or .venv is stale (make clean)" >&2; exit 1; }
endef

$(RUN_STAMP): requirements.lock $(PROJECT) | $(BIN)/python
	$(call install_locked,requirements.lock)
	touch $@

$(DEV_STAMP): requirements-dev.lock $(PROJECT) | $(BIN)/python
	$(call install_locked,requirements-dev.lock)
	touch $@ $(RUN_STAMP)

install: $(DEV_STAMP)

install-runtime: $(RUN_STAMP)

# uv (its pip compile) writes the locks: one universal file per use, for every platform and Python >= 3.11 (CI's
# 3.11 x86-64, developers' Linux and macOS, the image's 3.12 on arm64 and amd64), with the hashes of every wheel
# and sdist. The dev lock is resolved first; the runtime and build locks are constrained to it, so a package has
# one version in all three. uv is a tool of this target only, pinned in its own venv, not a dev dependency: CI and
# `make test` never run it.
UV_VERSION := 0.13.9
UV_VENV    := .venv-uv
UV         := $(UV_VENV)/bin/uv
UV_STAMP   := $(UV_VENV)/.uv-$(UV_VERSION)
LOCK_FLAGS  = --quiet --universal --python-version 3.11 --generate-hashes --custom-compile-command 'make lock'

$(UV_STAMP):
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	touch $@

lock: $(UV_STAMP)
	$(UV) pip compile $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) --extra dev -o requirements-dev.lock pyproject.toml
	$(UV) pip compile $(LOCK_FLAGS) -c requirements-dev.lock -o requirements.lock pyproject.toml
	$(PYTHON) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	  | $(UV) pip compile $(LOCK_FLAGS) -c requirements-dev.lock -o requirements-build.lock -

## Run the daemon (runtime dependencies only: no test tools) on 127.0.0.1:9898, JSON Lines under
## ./fpolicyd-data/events. A demo on a workstation should not listen on every interface: `make run
## LISTEN_HOST=0.0.0.0` when ONTAP must reach it. `serve` itself defaults to 0.0.0.0, which the container needs
## (ONTAP connects to the task's address; a container's loopback is unreachable from outside).
LISTEN_HOST ?= 127.0.0.1
run: $(RUN_STAMP)
	$(BIN)/fpolicyd serve --listen-host $(LISTEN_HOST)

## The whole suite, exactly what CI runs: lint, format check, mypy --strict, the import layers (import-linter, the
## contracts in pyproject.toml), pytest (warnings are errors).
test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

unit: $(DEV_STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/property

## Issue 11's speed goals, one table from one run (~2 min on 2 cores): events/s, server CPU per event (whole process
## tree), requests and billed chunks per event, peak RSS for JSON Lines, SQS, packed SQS and EventBridge (defaults and
## dedup off) against a bare frame splitter; p50/p95/p99 frame -> durable and frame -> SQS at 20,000 events/s.
## `--quick` for a smoke run, `--json FILE` for the figures: $(BIN)/python benchmarks/bench_throughput.py --help
bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/bench_throughput.py

## Issue 11's replay storm (~1 min): fpolicyd replay-test --events 1000000 --nodes 4 --duplicates 0.01 --shuffle
## --subprocess; wall time and events lost.
bench-replay: $(DEV_STAMP)
	$(BIN)/python benchmarks/bench_throughput.py --replay-only

## Where the time goes, in process: codec steps per event, what SQS packing bills.
bench-parts: $(DEV_STAMP)
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_ingest_step.py
	$(BIN)/python benchmarks/bench_sqs_pack.py

## Every benchmark a README figure comes from, one after the other (long: bench_throughput alone takes ~7 min; each prints its own table and
## says what it measured). tests/unit/test_benchmarks.py keeps this list equal to benchmarks/. Left out:
## profile_stages.py (a py-spy profile of a live daemon, read by eye: `pip install py-spy`, then its --help).
BENCHMARKS := bench_codec bench_ingest_step bench_delivery bench_durable bench_proto bench_router bench_settle bench_dedup bench_spool \
	bench_metrics bench_stages bench_aws_client bench_sqs bench_sqs_pack bench_ingest bench_processes \
	rss_after_backlog spool_sizing bench_throughput bench_scaleout
bench-all: $(DEV_STAMP)
	set -e; for name in $(BENCHMARKS); do echo "== benchmarks/$$name.py"; $(BIN)/python benchmarks/$$name.py; done

## Issue 14's long fuzz campaign: `fpolicyd serve` on 127.0.0.1 against 10^6 attacks (mutated real frames, random
## splits, garbage around NEGO, slow writers, RST and half-closes) beside a healthy session; progress every 10,000,
## a summary at the end (~300 inputs/s on 2 cores: about an hour; bounded by FUZZ_MAX_SECONDS too). The CI campaign
## (30 s) is tests/integration/test_fuzz_server.py. Options: $(BIN)/python benchmarks/fuzz_server.py --help
FUZZ_INPUTS      ?= 1000000
FUZZ_MAX_SECONDS ?= 7200
FUZZ_SEED        ?= 1
fuzz: $(DEV_STAMP)
	$(BIN)/python benchmarks/fuzz_server.py --inputs $(FUZZ_INPUTS) --max-seconds $(FUZZ_MAX_SECONDS) --seed $(FUZZ_SEED)

## Run the static checks of `make test` (ruff, format, mypy, import layers) before every commit: .pre-commit-config.yaml.
pre-commit-install: $(DEV_STAMP)
	$(BIN)/pre-commit install

clean:
	rm -rf $(VENV) $(UV_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis fpolicyd-data build src/fpolicyd/*.so
