# `make setup` builds .venv/ from nothing; `make test` runs the suite; `make demo` runs the job end to end.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup prometheus test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Debian's prometheus + promtool for the metrics integration test (root, or sudo without a password)
prometheus:
	@command -v prometheus >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

test: setup prometheus
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python pipelines/encode_dataset.py --demo

clean:
	rm -rf $(VENV) demo_output
