# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# They create a venv in the repo, install torch without CUDA packages when the machine has
# no NVIDIA GPU, install triton and grkernels (editable), then run.
#
# Knobs:  TORCH_SPEC   what to install as torch on a machine without a GPU (default: the
#                      2.13.0 CPU build; elsewhere add TORCH_PIP_ARGS="--index-url <PyTorch's CPU index>")
#         GPU_TORCH_SPEC  what to install on a machine with a GPU (default: torch from PyPI, CUDA build)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
GPU_TORCH_SPEC ?= torch
EXTRAS ?= dev,trl,bench,triton,lightning,accelerate,deepspeed
STAMP := $(VENV)/.grkernels-installed
DEMO_ARGS ?=
DEMO_OUT ?= demo_out
# verl pins transformers < 5.11 while the trl extra takes the newest: the verl tests get their own venv, with the
# same torch as the main one (tests/test_integration_verl.py; `make test` runs them there).
VERL_VENV ?= .venv-verl
VERL_PY := $(VERL_VENV)/bin/python
VERL_SPEC ?= verl==0.9.1
VERL_STAMP := $(VERL_VENV)/.grkernels-verl-installed

.PHONY: setup demo demo-quick quickstart test test-fast test-verl lint bench bench-gpu wheel clean

setup: $(STAMP)

# csrc/ sources too: the editable install compiles the C++ extension grkernels._C, so a changed kernel reinstalls
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif nvidia-smi -L >/dev/null 2>&1; then \
	    echo "NVIDIA GPU found: installing $(GPU_TORCH_SPEC)"; $(PIP) install -q "$(GPU_TORCH_SPEC)"; \
	else \
	    echo "no GPU: installing CPU-only $(TORCH_SPEC)"; $(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; \
	fi
	@# the extras (lightning, trl, ...) must not replace the torch installed above: pin it by a constraint
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	@# DS_BUILD_OPS=0: DeepSpeed (built from source) compiles no op at install; its tests JIT one small CPU op
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	@$(PY) -c "import torch, grkernels; print('grkernels', grkernels.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
	@touch $@

demo: $(STAMP)
	$(PY) -m grkernels demo --out $(DEMO_OUT) $(DEMO_ARGS)

demo-quick: $(STAMP)
	$(PY) -m grkernels demo --quick --out $(DEMO_OUT) $(DEMO_ARGS)

quickstart: $(STAMP)
	$(PY) -m grkernels quickstart

# Triton kernels run on CPU tensors under the interpreter when there is no GPU
# (tests/conftest.py sets TRITON_INTERPRET=1 in that case).
test: $(STAMP) $(VERL_STAMP)
	$(PY) -m ruff check grkernels tests bench examples
	$(PY) -m pytest -q
	$(VERL_PY) -m pytest -q tests/test_integration_verl.py

# GR in verl: 2 gloo processes, one verl policy update per case (about 1.5 min on 2 cores)
test-verl: $(VERL_STAMP)
	$(VERL_PY) -m pytest -q tests/test_integration_verl.py

$(VERL_STAMP): $(STAMP) pyproject.toml
	test -x $(VERL_PY) || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	@# the main venv's torch (CPU or CUDA build), pinned so that verl's requirements cannot replace it
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VERL_VENV)/torch-constraint.txt
	$(VERL_PY) -m pip install -q $(TORCH_PIP_ARGS) -r $(VERL_VENV)/torch-constraint.txt
	@# GRKERNELS_NO_EXT=1: the C++ CPU ops are optional; the verl tests do not need them built twice
	GRKERNELS_NO_EXT=1 $(VERL_PY) -m pip install -q --no-build-isolation -c $(VERL_VENV)/torch-constraint.txt \
	    "$(VERL_SPEC)" -e ".[verl]" pytest pytest-benchmark
	@$(VERL_PY) -c "import torch, verl, transformers; print('verl', verl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $@

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check grkernels tests bench examples

bench: $(STAMP)
	$(PY) -m pytest bench/bench_*.py -q --benchmark-enable --benchmark-only

bench-gpu: $(STAMP)
	$(PY) -m grkernels bench

wheel: $(STAMP)
	$(PY) -m build --wheel --no-isolation

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis .benchmarks $(DEMO_OUT)
