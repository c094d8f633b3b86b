# The registrar as a container: `docker run IMAGE` runs one registration on the SageMaker
# Processing paths (/opt/ml/processing/...), as PID 1, so it receives SIGTERM directly.
#
# Targets:
#   runtime (the last, so the default)  the package and its runtime dependencies, non-root
#   local     + the reference MIMS service and moto's S3 server (compose stack, demos)
#
# The base is a build argument and nothing else is pulled: the build works behind a mirror
# or offline (given a local base image, see scripts/container-smoke).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/registrar
COPY requirements/runtime.lock requirements/
RUN /opt/registrar/bin/pip install --quiet -r requirements/runtime.lock
COPY pyproject.toml README.md CHANGELOG.md ./
COPY async_registrar ./async_registrar
# The wheel carries the example's small files (the weights are made on the fly by `demo`).
COPY examples/demo/registration.json examples/demo/registration.json
COPY examples/demo/model/config.json examples/demo/model/config.json
COPY examples/demo/model/code examples/demo/model/code
COPY examples/demo/payload examples/demo/payload
COPY examples/demo/metadata examples/demo/metadata
RUN /opt/registrar/bin/pip install --quiet --no-deps . \
    && /opt/registrar/bin/python -m compileall -q /opt/registrar

FROM build AS build-local
COPY requirements/local.lock requirements/
RUN /opt/registrar/bin/pip install --quiet -r requirements/local.lock \
    && /opt/registrar/bin/python -m compileall -q /opt/registrar

FROM ${BASE_IMAGE} AS local
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin registrar
COPY --from=build-local /opt/registrar /opt/registrar
ENV PATH=/opt/registrar/bin:$PATH PYTHONUNBUFFERED=1 MALLOC_ARENA_MAX=2
USER registrar
ENTRYPOINT ["async-registrar"]
CMD ["--help"]

FROM ${BASE_IMAGE} AS runtime
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin registrar
COPY --from=build /opt/registrar /opt/registrar
# Two malloc arenas: with one per thread, 200 uploads at once in one process (scripts/bench
# --curves) peaked at 868 MiB of RSS under a 512 MiB budget; with two, 726 MiB.
ENV PATH=/opt/registrar/bin:$PATH PYTHONUNBUFFERED=1 MALLOC_ARENA_MAX=2
USER registrar
ENTRYPOINT ["async-registrar"]
CMD ["register"]
