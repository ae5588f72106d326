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
EXTRAS ?= dev,trl,bench,triton,lightning,accelerate,deepspeed,verl,peft,liger
STAMP := $(VENV)/.grkernels-installed
DEMO_ARGS ?=
DEMO_OUT ?= demo_out

.PHONY: setup demo demo-quick figures figures-redraw quickstart test test-fast test-verl lint bench bench-gpu wheel dist \
	wheel-smoke clean figures-auto

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

# The committed frontiers (docs/frontier.png, docs/frontier_curves.png, docs/frontier_table.txt, and the adaptive
# strength's trace docs/frontier_strength.png; the demo README's tables): the four worlds, every method at several
# strengths, 3 seeds, one command on one tree. 264 runs; about 2.3 h of CPU (70 min wall on 2 idle cores).
# FIGURES_OUT keeps results.json (and the pretrained policy's cache).
FIGURES_OUT ?= sweep_all
AUTO_SWEEP ?= gr_auto:0.3,1,3
FIGURES_SWEEP ?= kl:0.03,0.1,0.3;kl_reset:25,50,100;gr:0.01,0.1,1,10,100;gr_all:1,10;gr_every:1,10;gr_subset:1,10;none_lowlr:0.3;$(AUTO_SWEEP)
figures: $(STAMP)
	$(PY) -m grkernels demo --worlds collapse,rare,format,judge --sweep "$(FIGURES_SWEEP)" --seeds 3 \
	    --out $(FIGURES_OUT) --no-progress
	cp $(FIGURES_OUT)/frontier.png docs/frontier.png
	cp $(FIGURES_OUT)/demo.png docs/frontier_curves.png
	cp $(FIGURES_OUT)/strength.png docs/frontier_strength.png
	cp $(FIGURES_OUT)/table.txt docs/frontier_table.txt
# Redraw the committed figures from a finished sweep's results.json (seconds), e.g. after a change to the plots
figures-redraw: $(STAMP)
	$(PY) -m grkernels demo --from-results $(FIGURES_OUT)/results.json --out $(FIGURES_OUT)/redraw
	cp $(FIGURES_OUT)/redraw/frontier.png docs/frontier.png
	cp $(FIGURES_OUT)/redraw/demo.png docs/frontier_curves.png
	cp $(FIGURES_OUT)/redraw/strength.png docs/frontier_strength.png
# The adaptive strength alone (issue 23): none and gr_auto at three targets in the four worlds, 3 seeds (48 runs,
# about 25 CPU-min; 74 min wall under nice on 2 shared cores). Writes docs/frontier_auto.png (its frontiers),
# docs/frontier_strength.png (γ and gr_rel per step) and docs/frontier_auto_table.txt (with the tracking table);
# the committed ones ran with GRKERNELS_NO_CPP=1 (grkernels/demo/README.md, "Adaptive strength").
figures-auto: $(STAMP)
	nice -n 10 $(PY) -m grkernels demo --worlds collapse,rare,format,judge --sweep "$(AUTO_SWEEP)" --seeds 3 \
	    --out $(FIGURES_OUT)/auto --no-progress
	cp $(FIGURES_OUT)/auto/frontier.png docs/frontier_auto.png
	cp $(FIGURES_OUT)/auto/strength.png docs/frontier_strength.png
	cp $(FIGURES_OUT)/auto/table.txt docs/frontier_auto_table.txt
# The scale study (issue 27; grkernels/demo/README.md): per-method learning rate (collapse and format worlds, width
# 64, 5 seeds) and model size (both worlds, widths 64/128/256, KL and GR at two strengths each and the adaptive
# strength, 5 seeds at width 64 and 3 above); one command per part, resumable (finished runs are kept). Writes
# $(SCALE_OUT)/<part>/{summary.json,table.md,scale_<part>.png} and copies figures and summaries to docs/. Compute:
# the README's sizing paragraph (about 3 CPU-hours in all on this 2-core CPU).
SCALE_OUT ?= scale_out
.PHONY: scale-study scale-lr scale-size
scale-study: scale-lr scale-size
scale-lr: $(STAMP)
	nice -n 10 $(PY) -m grkernels.demo.scale --part lr --out $(SCALE_OUT)
	cp $(SCALE_OUT)/lr/scale_lr.png docs/scale_lr.png
	cp $(SCALE_OUT)/lr/summary.json docs/scale_lr_summary.json
scale-size: $(STAMP)
	nice -n 10 $(PY) -m grkernels.demo.scale --part size --out $(SCALE_OUT)
	cp $(SCALE_OUT)/size/scale_size.png docs/scale_size.png
	cp $(SCALE_OUT)/size/summary.json docs/scale_size_summary.json

quickstart: $(STAMP)
	$(PY) -m grkernels quickstart

# Triton kernels run on CPU tensors under the interpreter when there is no GPU
# (tests/conftest.py sets TRITON_INTERPRET=1 in that case). Two pytest workers (xdist, one test file per worker
# at a time): the suite is mostly single-threaded Python, so the two cores halve its time.
test: $(STAMP)
	$(PY) -m ruff check grkernels tests bench examples
	$(PY) -m pytest -q -n 2 --dist loadfile

# GR in verl: 2 gloo processes, one verl policy update per case (about 1.5 min on 2 cores)
test-verl: $(STAMP)
	$(PY) -m pytest -q tests/test_integration_verl.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check grkernels tests bench examples

bench: $(STAMP)
	$(PY) -m grkernels bench gr_step overhead ops

bench-gpu: $(STAMP)
	$(PY) -m grkernels bench

wheel: $(STAMP)
	$(PY) -m build --wheel --no-isolation

# Both artifacts into dist/: the sdist (with examples/ and docs/) and the wheel built from it (grkernels._C compiled
# against the torch installed here: install the wheel beside the same torch version, see README "Install")
dist: $(STAMP)
	$(PY) -m build --no-isolation

# The built wheel in a fresh venv that sees only its declared dependencies, run from outside the tree: --version,
# info, a GR step, quickstart, demo (about a minute; `make test` runs it too, as tests/test_package.py)
wheel-smoke: $(STAMP)
	$(PY) -m pytest -q -p no:xdist tests/test_package.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis .benchmarks $(DEMO_OUT)
