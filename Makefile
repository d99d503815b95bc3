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
# CPU_ISA=avx2 runs any target as on a CPU without native bf16: oneDNN, ATen and MKL keep to AVX2,
# so precision=auto picks fp32 there too (README, Tests). SIMFREEZE_NATIVE_BF16=0/1 forces only that answer.
ifeq ($(CPU_ISA),avx2)
export ONEDNN_MAX_CPU_ISA := AVX2
export ATEN_CPU_CAPABILITY := avx2
export MKL_ENABLE_INSTRUCTIONS := AVX2
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
	@echo "  ARGS=\"...\" passes Hydra overrides to train (or flags to bench); CPU_ISA=avx2 runs as on a CPU without native bf16"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the project with its test tools

train: install  ## the paper's protocol: python -m train +experiment=cat_to_dog $(ARGS)
	$(BIN)/python -m train +experiment=cat_to_dog $(ARGS)

test: install  ## the test suite (two workers; PYTEST_ARGS=... for more)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Fit times of the arms side by side in one process (medians of 3); see README, Performance.
bench: install  ## fit times of the arms side by side (python -m simfreeze.bench)
	$(BIN)/python -m simfreeze.bench $(ARGS)

clean:  ## remove .venv and build leftovers (not outputs/)
	rm -rf $(VENV) src/*.egg-info .pytest_cache
