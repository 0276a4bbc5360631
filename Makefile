# Everything a fresh machine needs, from a clean clone: `make demo`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test unit integration typecheck docs bench report clean

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m carrot_kombu demo

test: $(STAMP)
	$(PY) -m pytest
	$(PY) -m mypy
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

unit: $(STAMP)
	$(PY) -m pytest tests

integration: $(STAMP)
	$(PY) -m pytest integration

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m benchmarks

report: $(STAMP)
	$(PY) -m integration.report

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .mypy_cache
