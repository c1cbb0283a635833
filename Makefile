# The whole set-up on a fresh machine is `make run` or `make test`; both share one virtual
# environment, created on first use and refreshed when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[rl,test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m ringenv run

test: $(STAMP)
	$(PY) -m pytest -n auto

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
