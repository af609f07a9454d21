# The two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-boundscheck lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/ekko demo

# numba does not check array bounds: the tests of every kernel run once more with checks
# on, in a fresh kernel cache (kernels cached without checks would be reused otherwise), so
# an out-of-bounds index fails a test instead of corrupting memory: the store's and the
# protocol's, the codecs', the serving node's (a scatter's split, merge and answer checks,
# its distinct ids) and a holder's lookup frames read from the wire.
BOUNDSCHECK_TESTS := tests/store tests/protocol tests/codec tests/serve/test_unique_columns.py \
	tests/serve/test_scatter_flat.py tests/serve/test_scatter.py tests/serve/test_scatter_batch.py \
	tests/serve/test_scatter_replica.py tests/serve/test_lookup_stream.py \
	tests/node/test_stream_reads.py tests/node/test_stream_hostile.py

test: venv
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15
	$(MAKE) --no-print-directory test-boundscheck

test-boundscheck: venv
	cache=$$(mktemp -d) && NUMBA_BOUNDSCHECK=1 NUMBA_CACHE_DIR=$$cache \
	  $(BIN)/python -m pytest -q -p no:cacheprovider $(BOUNDSCHECK_TESTS); \
	  rc=$$?; rm -rf "$$cache"; exit $$rc

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports
	$(BIN)/ruff format --check src tests

bench: venv
	for b in apply churn latency ablation train serve freshness rollback bandwidth congestion; do $(BIN)/ekko bench $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
