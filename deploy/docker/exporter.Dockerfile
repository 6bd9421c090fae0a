# syntax=docker/dockerfile:1
# gpu-health-exporter. Build from the repository root:
#   docker build -f deploy/docker/exporter.Dockerfile -t gpu-health-exporter:0.1.0 .
# Run on a GPU host (the NVIDIA Container Toolkit gives it NVML and /dev/nvidia*):
#   docker run --runtime=nvidia -e NODE_NAME=$(hostname) -p 9835:9835 \
#     -v /var/log/journal:/var/log/journal:ro -v /run/log/journal:/run/log/journal:ro \
#     -v /etc/machine-id:/etc/machine-id:ro --group-add "$(getent group systemd-journal | cut -d: -f3)" \
#     -v /var/lib/gpu-health-exporter:/var/lib/gpu-health-exporter gpu-health-exporter:0.1.0 --xid.source=journal
# On Kubernetes: deploy/kubernetes (it runs the image as uid 0 without capabilities to read the host's journal).
#
# Base: Debian 13 (trixie) slim. Its journalctl (systemd 257) reads the journal files of current hosts (compact
# and keyed-hash formats); the exporter runs it to read the host's journal (--xid.source=journal).
#
# Supply chain: third-party Python code comes only from exporter.lock, pinned with hashes and installed in pip's
# hash-checking mode, as wheels (no build runs someone else's setup.py); the project itself is installed without
# dependencies and without build isolation (which would fetch setuptools unchecked). Regenerate the lock with
# `python tools/lock_requirements.py`; pin the base images by digest at release time with
# `python tools/pin_base_images.py` (docs/install/containers.md).

FROM python:3.13.13-slim-trixie AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/docker/exporter.lock pyproject.toml README.md ./
COPY gpu_health_common ./gpu_health_common
COPY exporter ./exporter
COPY remediation_webhook ./remediation_webhook
RUN python -m venv /opt/gpu-health \
 && /opt/gpu-health/bin/pip install --no-compile --require-hashes --only-binary=:all: -r exporter.lock \
 && /opt/gpu-health/bin/pip install --no-compile --no-deps --no-build-isolation . \
 && /opt/gpu-health/bin/pip uninstall --yes pip setuptools

FROM python:3.13.13-slim-trixie
# journalctl (package systemd) for the journal source; nothing else is installed.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends systemd \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 gpu-health \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gpu-health
COPY --from=build /opt/gpu-health /opt/gpu-health
ENV PATH=/opt/gpu-health/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility
USER 65532:65532
EXPOSE 9835
# Kubernetes ignores HEALTHCHECK: deploy/kubernetes probes GET /healthz. This one assumes the default listen
# address and plain HTTP.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9835/healthz', timeout=4)"]
ENTRYPOINT ["gpu-health-exporter"]
