# syntax=docker/dockerfile:1
# files-proxy image: `docker build -t files-proxy .` from the repository root.
#
# Nothing secret is baked in. At run time mount:
#   - the config at /etc/files-proxy/config.toml (a Kubernetes ConfigMap, or a bind mount);
#   - each tenant's Anthropic key as the environment variable its `api_key_env` names, or as a file
#     under /run/secrets that its `api_key_file` names.
# The final stage holds the runtime virtualenv only: no dev extras, no compilers, no pip.

# --- builder: build the project's wheel and install it with its runtime dependencies ---------------
# Pinned by tag; for fully reproducible builds pin the digest too (python:3.11-slim-bookworm@sha256:...).
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/venv

WORKDIR /src
# Only what the build needs (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY proxy ./proxy

# Every dependency ships manylinux wheels, so no build tools are needed. The pip cache lives in a
# BuildKit cache mount: fast rebuilds, and nothing of it ends up in a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# --- runtime -----------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="files-proxy" \
      org.opencontainers.image.description="A caching reverse proxy for the Anthropic Files API" \
      org.opencontainers.image.version="0.1.0"

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed uid/gid, so that Kubernetes can check runAsNonRoot and runAsUser: 10001 matches.
RUN groupadd --system --gid 10001 files-proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin files-proxy

# The venv's interpreter links to /usr/local/bin/python of this same base image. Owned by root:
# the proxy's user can read the code but not change it.
COPY --from=builder /opt/venv /opt/venv

WORKDIR /srv/files-proxy
USER 10001:10001

EXPOSE 8080
# SIGTERM: stop accepting, finish requests in flight for up to server.shutdown_grace_s (30 s by
# default), then exit 0. Give the runtime more than that (`docker stop -t 40`, compose
# stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# Slim images have no curl: ask /healthz with the standard library (no proxy from the environment;
# a non-2xx answer, a refused connection or a timeout exits non-zero).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8080/healthz', timeout=3); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["files-proxy"]
CMD ["serve", "--config", "/etc/files-proxy/config.toml", "--host", "0.0.0.0", "--port", "8080"]
