# syntax=docker/dockerfile:1
# fpolicyd: multi-stage, non-root, exec-form entrypoint (SIGTERM reaches the daemon, which drains its sinks).
# Builds for linux/arm64 (Fargate Graviton, EC2 t4g) and linux/amd64 from the same file:
#   docker buildx build --platform linux/arm64,linux/amd64 -t fpolicyd .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/fpolicyd \
 && /opt/fpolicyd/bin/pip install --no-compile . \
 && /opt/fpolicyd/bin/python -m compileall -q /opt/fpolicyd/lib

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="fpolicyd" \
      org.opencontainers.image.description="ONTAP FPolicy external server" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fpolicyd \
 && useradd --system --uid 10001 --gid fpolicyd --home-dir /var/lib/fpolicyd --shell /usr/sbin/nologin fpolicyd \
 && install -d -o fpolicyd -g fpolicyd -m 0750 /var/lib/fpolicyd
COPY --from=build /opt/fpolicyd /opt/fpolicyd
ENV PATH=/opt/fpolicyd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FPOLICYD_DATA_DIR=/var/lib/fpolicyd
# Events and (from the durability release on) the spool live here: mount a volume so they survive the task.
VOLUME ["/var/lib/fpolicyd"]
WORKDIR /var/lib/fpolicyd
USER 10001:10001
# 9898: FPolicy (ONTAP connects here, from the SVM data LIFs only).
EXPOSE 9898
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/fpolicyd/bin/fpolicyd"]
CMD ["serve"]
