# fxpress: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxpress-installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist); each test runs at one torch thread. Files stay whole on one worker.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

.PHONY: venv demo test test-fast fixtures clean

$(STAMP): requirements.txt requirements-data.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "from fxpress.backends.native import build_library; build_library()"
	$(PY) -c "from fxpress.cli.target_check import target_table; target_table()"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fxpress demo

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS) tests

# Skips the tests marked slow (real LLM loading and capture); CI runs everything.
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS) tests

# Retrain the shipped fixtures (about a minute each on one core).
fixtures: $(STAMP)
	$(PY) scripts/train_vit_mnist.py
	$(PY) scripts/train_bnn_digits.py
	$(PY) scripts/finetune_bnn_mst.py
	$(PY) scripts/train_cnn_digits.py
	$(PY) scripts/train_tokens_ae.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
