# One-command setup: every target creates .venv and installs what it needs when missing.
# A second run skips what is done (the stamp file is written last, so an interrupted install resumes).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seqrec-installed
TORCH_VERSION ?= 2.13.0
PETASTORM_VERSION ?= 0.13.1
# TorchRec and its FBGEMM kernels are tied to one torch minor version: pinned as a pair. On CPU the
# kernels come from fbgemm-gpu-cpu; torchrec declares the CUDA fbgemm-gpu, hence --no-deps (its runtime
# deps are in requirements.txt). A GPU image installs the fbgemm-gpu build matching its torch instead.
TORCHREC_VERSION ?= 1.8.0
FBGEMM_PACKAGE ?= fbgemm-gpu-cpu==1.8.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) requirements.txt pyproject.toml
	@# torch first: anything asking for plain `torch` would otherwise fetch a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps "petastorm==$(PETASTORM_VERSION)"
	$(PY) -m pip install --no-deps "torchrec==$(TORCHREC_VERSION)" "$(FBGEMM_PACKAGE)"
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	bash launch/demo.sh

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "unit"

bench: $(STAMP)
	$(PY) benchmarks/prepare_throughput.py
	$(PY) benchmarks/train_throughput.py

lint: $(STAMP)
	$(VENV)/bin/ruff check seqrec spark_jobs tests benchmarks

clean:
	rm -rf runs/demo data/demo .pytest_cache
