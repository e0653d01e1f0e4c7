# Everything a fresh machine needs, in two targets: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
BTX := $(VENV)/bin/btx
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps demo test test-all test-unit test-gpu bench

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

# What the integration tests run besides Python: PostgreSQL (under the Prefect server) and
# Chromium (renders the Prefect UI), found where the tests look for them. apt-get only for what
# is missing, so this is instant on a machine that has both; `apt-get update` only then.
system-deps:
	@missing=""; \
	{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || missing="$$missing postgresql"; \
	{ command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	    command -v apt-get >/dev/null || { echo "install these first:$$missing" >&2; exit 1; }; \
	    sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "+ apt-get install$$missing"; \
	    $$sudo apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing; \
	fi

demo: setup
	$(BTX) run configs/demo.yaml

test: setup system-deps
	$(VENV)/bin/pytest -m "(unit or integration) and not slow" -q

test-all: setup system-deps
	$(VENV)/bin/pytest -m "unit or integration" -q

test-unit: setup
	$(VENV)/bin/pytest -m unit -q

test-gpu: setup
	$(VENV)/bin/pytest -m gpu -q

bench: setup
	$(PY) bench/train_throughput.py
