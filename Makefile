# One-command set-up on a fresh machine: every target creates/reuses the virtualenv, installs,
# builds the extension (CPU + CUDA kernels when nvcc exists) and runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA 13 build of torch from the registry: its CUDA major matches nvcc 13 so the CUDA
# kernels compile (torch's extension builder refuses a major-version mismatch).
TORCH_SPEC ?= torch==2.14.1
# The torchvision release built against that torch (the torchdistill extra needs one).
TORCHVISION_SPEC ?= torchvision==0.29.1
export CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(firstword $(wildcard /usr/local/cuda/bin/nvcc)))
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export MAX_JOBS ?= 2
CSRC := $(shell find csrc -type f) setup.py

.PHONY: all demo test check-wheel test-gpu gpu-static bench lint format build clean

all: test

# The editable install compiles the extension in place (fastkd/_C*.so).
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,demo,torchdistill]"
	touch $@

# Recompile only when a source changed after that install (or the .so was cleaned): right
# after a fresh install a second compile would redo minutes of identical work.
$(VENV)/.built: $(VENV)/.deps $(CSRC)
	if [ -n "$$(find $(CSRC) -newer $(VENV)/.deps)" ] || ! ls fastkd/_C*.so >/dev/null 2>&1; \
	then $(PY) setup.py -q build_ext --inplace; fi
	touch $@

build: $(VENV)/.built

demo: build
	$(VENV)/bin/fastkd demo

# The benchmark suite runs once untimed (--benchmark-disable) beside the tests so it never rots.
# Last, the install path of a user without a checkout: sdist -> CPU-only wheel -> import in a
# throwaway virtualenv (tools/check_wheel.sh, a few minutes).
test: build
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -ra tests benchmarks --benchmark-disable
	tools/check_wheel.sh $(PY)

check-wheel: build
	tools/check_wheel.sh $(PY)

# The GPU suite, for a machine with a CUDA device (one call: set-up, CUDA build, GPU tests).
# Triton must run compiled there, not in the interpreter the CPU suite uses.
test-gpu: build
	TRITON_INTERPRET=0 $(PY) -m pytest -q -ra -m gpu tests

# Static GPU report without a GPU: every Triton kernel compiled for sm_80/sm_90 and the SASS of
# fastkd._C (make test runs its CI subset through tests/test_gpu_static.py).
gpu-static: build
	$(PY) -m tools.gpu_static --sweep full --write docs/gpu-static.md

bench: build
	$(VENV)/bin/fastkd bench

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf build fastkd/_C*.so $(VENV)/.built
