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

run: $(STAMP)
	$(PY) -m model.generate --checkpoint tiny --prompt "The TPU v5e is" --max-tokens 24 --json

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
