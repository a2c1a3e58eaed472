# Fresh machine → everything: `make demo` (train on the embedded demo set) and `make test` (the test suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench gpu-check clean

$(STAMP): pyproject.toml
	@if ! dpkg -s libturbojpeg0-dev libopencv-dev pkg-config >/dev/null 2>&1; then \
		echo "installing FFCV's system libraries (apt)"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq pkg-config libturbojpeg0-dev libopencv-dev >/dev/null; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q numpy numba "timm==1.0.31" "deepspeed==0.19.8" rich pyyaml safetensors pillow \
		"nvidia-dali-cuda130==2.4.0" pytest ruff matplotlib
	$(PIP) install -q "ffcv==1.0.2"
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m dino_fast.train --config dino_fast/configs/demo.yaml $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks.run_all $(ARGS)

clean:
	rm -rf runs data/demo .pytest_cache
