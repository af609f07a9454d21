# The two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/ekko demo

test: venv
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: venv
	for b in apply churn latency ablation train serve freshness rollback bandwidth congestion; do $(BIN)/ekko bench $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
