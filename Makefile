# dualwrite developer and CI entry points. `make test` is what .ci/run runs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test lint bench demo clean distclean

venv: $(STAMP)

# re-install when the package metadata or the C extension build changes
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/mypy scripts/check_import_cycles.py
	$(BIN)/python scripts/check_import_cycles.py

bench: venv
	$(BIN)/python -m bench

demo: venv
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	$(BIN)/dualwrite demo

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache .import_linter_cache reports
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
	find proxy -name '*.so' -delete
	rm -f $(STAMP)

distclean: clean
	rm -rf $(VENV) .demo dualwrite-demo
