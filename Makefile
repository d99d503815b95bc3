# Two commands do all the set-up: `make train` (the main job) and `make test` (the test suite).
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra Hydra overrides for `make train`, e.g. make train ARGS="seed=0,1,2"
ARGS ?=
PYTEST_ARGS ?=
# Test workers (pytest-xdist); each runs torch with one thread. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
# CPU_ISA caps the instruction sets oneDNN, ATen and MKL may use, to run any target as on another
# CPU kind (docs/testing.md). A cap only lowers: on a machine without the named set nothing changes.
#   avx512_bf16  as an AVX512-BF16 CPU without AMX (AMD EPYC Zen 4): bf16 native, no AMX tiles
#   avx2         as a CPU without native bf16: precision=auto picks fp32 there too
# SIMFREEZE_NATIVE_BF16=0/1 forces only precision=auto's answer.
ifeq ($(CPU_ISA),avx2)
export ONEDNN_MAX_CPU_ISA := AVX2
export ATEN_CPU_CAPABILITY := avx2
export MKL_ENABLE_INSTRUCTIONS := AVX2
else ifeq ($(CPU_ISA),avx512_bf16)
export ONEDNN_MAX_CPU_ISA := AVX512_CORE_BF16
export ATEN_CPU_CAPABILITY := avx512
export MKL_ENABLE_INSTRUCTIONS := AVX512
else ifneq ($(CPU_ISA),)
$(error CPU_ISA=$(CPU_ISA) is not a lane: use avx512_bf16 or avx2, or leave it unset for this CPU's own)
endif

# Point the project at a local CIFAR-10 ImageFolder when one sits beside the repository
# (../shared/data/cifar10); otherwise torchvision downloads CIFAR-10 on first use.
SHARED_CIFAR10 := $(abspath ../shared/data/cifar10)
ifeq ($(CIFAR10_ROOT),)
ifneq ($(wildcard $(SHARED_CIFAR10)/train),)
export CIFAR10_ROOT := $(SHARED_CIFAR10)
endif
endif

.PHONY: help install train test bench clean

help:  ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## /  make \1\t/' | expand -t 16
	@echo "  ARGS=\"...\" passes Hydra overrides to train (or flags to bench); CPU_ISA=avx512_bf16|avx2 runs as on another CPU kind (docs/testing.md)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the project with its test tools

train: install  ## the paper's protocol: python -m train +experiment=cat_to_dog (ARGS="..." adds overrides)
	$(BIN)/python -m train +experiment=cat_to_dog $(ARGS)

test: install  ## the test suite (two workers; PYTEST_ARGS=... for more)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Fit times of the arms side by side in one process (medians of 3); see docs/performance.md.
bench: install  ## fit times of the arms side by side (python -m simfreeze.bench)
	$(BIN)/python -m simfreeze.bench $(ARGS)

clean:  ## remove .venv and build leftovers (not outputs/)
	rm -rf $(VENV) src/*.egg-info .pytest_cache
