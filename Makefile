# Everything a fresh machine needs, in two targets: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
BTX := $(VENV)/bin/btx
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit bench clean-demo

setup: $(VENV)/.installed

# torch first, pinned: the CPU build that lies on these machines. A bare `torch` requirement
# resolved by pip would otherwise pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
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

bench: setup
	$(PY) bench/train_throughput.py
