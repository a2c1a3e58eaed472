# Fresh machine → everything: `make demo` (train on the embedded demo set) and `make test` (the test suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench bench-readme gpu-wheels ffcv-carry gpu-prep clean

$(STAMP): pyproject.toml
	@if ! dpkg -s libturbojpeg0-dev libopencv-dev pkg-config >/dev/null 2>&1; then \
		echo "installing FFCV's system libraries (apt)"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq pkg-config libturbojpeg0-dev libopencv-dev >/dev/null; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q numpy numba "timm==1.0.31" "deepspeed==0.19.8" rich pyyaml safetensors pillow tensorboard \
		"nvidia-dali-cuda130==2.4.0" pytest ruff matplotlib scikit-image scikit-learn
	$(PIP) install -q "ffcv==1.0.2"
	$(PIP) install -q "transformers==5.25.0" "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0"  # the export extra
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m dino_fast.train --config dino_fast/configs/demo.yaml $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

# The inner loop: the suite without the tests marked slow (the demo run, multi-process runs, the GPU-check rehearsal).
test-fast: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# Every benchmark on this machine (--quick sizes on a CPU); records and the printed summary go to
# benchmarks/results/local/ (git-ignored): no tracked file changes.
bench: setup
	$(PY) -m benchmarks.run_all $(ARGS)

# The maintainer's: the README's performance table (newest row per piece and device) from the tracked
# benchmarks/results/*.json; measures nothing.
bench-readme: setup
	$(PY) -m benchmarks.run_all --readme

# Wheels the lent GPU machine lacks (it has torch, triton, timm, rich, numpy but no deepspeed), for
# benchmarks/gpu/gpu_check.sh: carried in .whl/ (git-ignored).
gpu-wheels: setup
	mkdir -p .whl
	$(PIP) wheel -q --no-deps deepspeed==0.19.8 -w .whl
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
		hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
		typing_extensions==4.16.0

# FFCV for the lent GPU machine (Python 3.12, no ffcv, no registry): the package, its C extension built for 3.12
# (when a 3.12 with headers is here; else the installed build under a suffix every CPython imports) and the shared
# libraries it links, checked to load from there; ~23 MiB in .ffcv_carry/ (git-ignored), carried by gpu_check.sh.
ffcv-carry: setup
	$(PY) -m benchmarks.gpu.ffcv_carry --out .ffcv_carry

# Everything the GPU check needs beside the tree, checked before a lent GPU's minutes are spent: the wheels, FFCV, the
# reference repository's three files (sha256 sums in benchmarks/gpu/reference_dino.sha256); prints the device calls.
gpu-prep: gpu-wheels ffcv-carry
	$(PY) -m benchmarks.gpu.prep

clean:
	rm -rf runs data/demo .pytest_cache
