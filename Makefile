# Two entry points (see README.md): `make run` and `make test`. Each creates .venv and installs
# the project into it on first use (and again whenever pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Ray 2.60 turns token auth on for a fresh local cluster, after which the `serve` CLI gets HTTP 401.
# This project runs local clusters with auth disabled, consistently, in `run` and in `test`.
export RAY_AUTH_MODE ?= disabled

.PHONY: run test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole Serve graph on CPU (tiny preset, real tokenizer) on http://127.0.0.1:8000; Ctrl-C stops it.
run: $(STAMP)
	$(VENV)/bin/serve run serve_config.yaml

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
