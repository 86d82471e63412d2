# syntax=docker/dockerfile:1
# fpolicyd: ONTAP FPolicy external server.
#   docker buildx build --platform linux/arm64,linux/amd64 -t fpolicyd:0.1.0 .
# Dependencies come from requirements.lock (`make lock`), never from pyproject.toml's ranges: the image does not
# change when a dependency releases, and pip checks every downloaded file against the lock's hashes.
# Both architectures build from this one file: no arch-specific step, and every dependency in requirements.lock
# ships a CPython 3.12 manylinux wheel for aarch64 and x86_64 (the install takes wheels only; check a new lock with
# `pip download --only-binary=:all: --require-hashes -r requirements.lock --python-version 3.12
# --platform manylinux2014_aarch64 -d /tmp/wheels`, and again with manylinux2014_x86_64). The one thing compiled
# here is fpolicyd's own C accelerator (src/fpolicyd/_speedups.c, the reader's hot path; plain C99 and the CPython
# API), by the builder stage's gcc for whichever architecture it runs on, with the setuptools pinned in
# requirements-build.lock; the build fails if it did not compile, and the runtime image carries only the compiled
# module, no compiler and no setuptools.
#
# Signals: the exec-form ENTRYPOINT makes fpolicyd PID 1 (no shell in between), so `docker stop` / ECS deliver
# SIGTERM to it; it installs its own SIGTERM/SIGINT handlers and drains (read grace, then sinks within
# drain_timeout_s) before exiting. No tini: fpolicyd starts no child processes (nothing to reap; the health check
# is exec'd by the runtime, not by PID 1) and does not rely on a default signal action (which the kernel withholds
# from PID 1). `docker run --init` adds tini anyway if a platform insists.

# One interpreter for both stages: the venv copied across points at /usr/local/bin/python3.12.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The C compiler for the accelerator, in this stage only. Versions are Debian bookworm's current ones, not
# pinned: libc6-dev must equal the image's libc6 release, which a pin would break at the next point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install --yes --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# The dependencies first, in their own layer (rebuilt only when a lock changes, not at every source edit):
# the runtime venv /opt/fpolicyd gets exactly requirements.lock, a build venv /opt/build the pinned setuptools.
COPY requirements.lock requirements-build.lock ./
RUN python -m venv /opt/fpolicyd \
 && /opt/fpolicyd/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock \
 && python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r requirements-build.lock
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# Build the wheel with the locked setuptools (no build isolation, so nothing unpinned is fetched; it compiles the
# accelerator), then install it alone into the runtime venv (--no-deps: its dependencies are the lock's), check
# that they satisfy it (pip check fails if pyproject.toml asks for something the lock does not hold); pip itself
# is not needed at run time. The extension is optional for `pip install` (a machine without a compiler gets the
# pure-Python path), not for this image.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/fpolicyd/bin/pip install --no-deps /wheels/fpolicyd-*.whl \
 && /opt/fpolicyd/bin/pip check \
 && /opt/fpolicyd/bin/python -c "import fpolicyd._speedups" \
 && /opt/fpolicyd/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="fpolicyd" \
      org.opencontainers.image.description="ONTAP FPolicy external server" \
      org.opencontainers.image.licenses="Apache-2.0"
# Fixed UID/GID 10001 (not in the base image, not root): volume ownership and IAM/EFS access points can name it.
RUN groupadd --system --gid 10001 fpolicyd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/fpolicyd \
      --shell /usr/sbin/nologin fpolicyd \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/fpolicyd
COPY --from=builder /opt/fpolicyd /opt/fpolicyd
ENV PATH=/opt/fpolicyd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FPOLICYD_DATA_DIR=/var/lib/fpolicyd
# Spool (write-ahead log), JSON Lines and dead-letter files. Mount a volume here: a new volume starts as this
# directory (owned by 10001); a bind-mounted host directory must be writable by UID 10001.
VOLUME ["/var/lib/fpolicyd"]
WORKDIR /var/lib/fpolicyd
USER 10001:10001
# 9898: FPolicy (ONTAP's SVM data LIFs connect here).
EXPOSE 9898
# 9100: /metrics, /healthz, /readyz. Documentation only: the daemon binds it to 127.0.0.1 unless
# FPOLICYD_HTTP_HOST says otherwise (the health check below runs inside the container and needs nothing more).
EXPOSE 9100
STOPSIGNAL SIGTERM
# Probes HTTP /healthz, never a TCP connect to 9898 (that would look like an ONTAP session that never negotiates).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["fpolicyd", "healthcheck"]
ENTRYPOINT ["fpolicyd"]
CMD ["serve"]
