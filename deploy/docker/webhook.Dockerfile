# syntax=docker/dockerfile:1
# gpu-health-webhook, the remediation webhook. Build from the repository root:
#   docker build -f deploy/docker/webhook.Dockerfile -t gpu-health-webhook:0.1.0 .
# with the cloud SDKs of every provider; for one cloud only, or none (cordon, drain, executor Jobs, Slurm):
#   docker build -f deploy/docker/webhook.Dockerfile --build-arg PROVIDERS=aws -t gpu-health-webhook:0.1.0-aws .
# (PROVIDERS: all, the default; aws, gcp, azure; none). A config naming a provider whose SDK the image lacks
# fails `gpu-health-webhook check-config` with the package's name.
# Run it with a config file (deploy/webhook/example.yaml; check it with `gpu-health-webhook check-config`):
#   docker run -v $PWD/config.yaml:/etc/gpu-health-webhook/config.yaml:ro \
#     -v gpu-health-journal:/var/lib/gpu-health-webhook -p 9096:9096 gpu-health-webhook:0.1.0
# with web.listen_address ":9096" and journal.path under /var/lib/gpu-health-webhook in the config.
# On Kubernetes: deploy/kubernetes.
#
# Supply chain: third-party Python code comes only from webhook.lock, pinned with hashes and installed in pip's
# hash-checking mode, as wheels (no build runs someone else's setup.py); the project itself is installed without
# dependencies and without build isolation (which would fetch setuptools unchecked). Regenerate the lock with
# `python tools/lock_requirements.py`; pin the base images by digest at release time with
# `python tools/pin_base_images.py` (docs/install/containers.md).

FROM python:3.13.13-slim-trixie AS build
ARG PROVIDERS=all
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/docker/webhook*.lock pyproject.toml README.md ./
COPY gpu_health_common ./gpu_health_common
COPY exporter ./exporter
COPY remediation_webhook ./remediation_webhook
RUN case "$PROVIDERS" in \
      none) lock=webhook.lock ;; \
      aws|gcp|azure|all) lock=webhook-$PROVIDERS.lock ;; \
      *) echo "PROVIDERS: one of all, aws, gcp, azure, none; got '$PROVIDERS'" >&2; exit 1 ;; \
    esac \
 && python -m venv /opt/gpu-health \
 && /opt/gpu-health/bin/pip install --no-compile --require-hashes --only-binary=:all: -r "$lock" \
 && /opt/gpu-health/bin/pip install --no-compile --no-deps --no-build-isolation . \
 && /opt/gpu-health/bin/pip uninstall --yes pip setuptools

FROM python:3.13.13-slim-trixie
RUN groupadd --system --gid 65532 gpu-health \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gpu-health \
 && install -d -o 65532 -g 65532 -m 0750 /var/lib/gpu-health-webhook
COPY --from=build /opt/gpu-health /opt/gpu-health
ENV PATH=/opt/gpu-health/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /var/lib/gpu-health-webhook
VOLUME ["/var/lib/gpu-health-webhook"]
EXPOSE 9096 9097
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9096/healthz', timeout=4)"]
ENTRYPOINT ["gpu-health-webhook"]
CMD ["--config", "/etc/gpu-health-webhook/config.yaml"]
