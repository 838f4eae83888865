# `make setup` builds .venv/ from nothing; `make test` runs the suite; `make demo` runs the job end to end.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -e '.[test]'
	@# byte-compile once, on every core (pip compiles on one); PYTHONDONTWRITEBYTECODE may be set, so
	@# modules would otherwise be recompiled by every process that imports them. Errors are files of
	@# packages' own tests in old syntax, as pip ignores them too.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $(STAMP)

# Debian's prometheus + promtool (the metrics integration test) and ffmpeg (the ingest benchmark's
# reference command), installed if missing (root, or sudo without a password)
system-deps:
	@command -v prometheus >/dev/null && command -v ffmpeg >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus ffmpeg >/dev/null; }

test: setup system-deps
	$(BIN)/python -m pytest -q --durations=15 tests

demo: setup
	$(BIN)/python pipelines/encode_dataset.py --demo

# the CPU benchmarks (results/*_cpu.json + plots); GPU ones: see README "Benchmarks"
bench: setup
	$(BIN)/python -m benchmarks.bench_ingest
	$(BIN)/python -m benchmarks.bench_pipeline
	$(BIN)/python -m benchmarks.bench_reader
	$(BIN)/python -m benchmarks.bench_text
	$(BIN)/python -m benchmarks.bench_dryrun
	$(BIN)/python -m benchmarks.bench_chunk_memory
	$(BIN)/python -m benchmarks.bench_bytes
	$(BIN)/python -m benchmarks.bench_kernels --device cpu --frames 9 --size 64 --channels 32

clean:
	rm -rf $(VENV) demo_output
