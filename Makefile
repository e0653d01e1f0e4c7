# Everything a fresh machine needs, in two targets: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
BTX := $(VENV)/bin/btx
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit test-gpu bench

setup: $(VENV)/.installed

# torch first, pinned: on our machines a CPU build of it lies on disk, and a bare `torch`
# requirement resolved later by pip would pull a multi-GB CUDA build. Elsewhere choose the
# build with e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_PIP_ARGS ?=
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BTX) seed configs/demo.yaml
	for domain in math code knowledge; do $(BTX) train-expert configs/demo.yaml --domain $$domain || exit 1; done
	$(BTX) status configs/demo.yaml

test: setup
	$(VENV)/bin/pytest -m "unit or integration" -q

test-unit: setup
	$(VENV)/bin/pytest -m unit -q

test-gpu: setup
	$(VENV)/bin/pytest -m gpu -q

bench: setup
	$(PY) bench/train_throughput.py
