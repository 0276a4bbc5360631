# Everything a fresh machine needs, from a clean clone: `make demo`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The low end of the supported range (setup.cfg: amqp>=5.2, kombu>=5.3): the
# library's suite runs there too, against the fenced py-amqp layer.
LOW ?= .venv-low
LOW_PINS := "amqp==5.2.0" "kombu==5.3.7" "vine==5.0.0" "backoff==2.2.1" "pytest>=7" "hypothesis>=6"
LOW_STAMP := $(LOW)/.installed-stamp
# (the unit suite drives the fenced py-amqp layer through a scripted fake broker;
# the two integration modules take it to the real broker, within CI's time budget)
LOW_TESTS := tests integration/test_core.py integration/test_isolation_property.py

.PHONY: demo test test-high test-low-end test-slow unit integration typecheck lint docs bench report clean

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

$(LOW_STAMP): setup.cfg pyproject.toml
	python3 -m venv $(LOW)
	$(LOW)/bin/python -m pip install --quiet $(LOW_PINS)
	$(LOW)/bin/python -m pip install --quiet --no-deps -e .
	touch $(LOW_STAMP)

demo: $(STAMP)
	$(PY) -m carrot_kombu demo

# The whole suite: newest supported amqp/kombu/Celery, then the oldest amqp/kombu.
test: test-high test-low-end

test-high: $(STAMP)
	$(PY) -m ruff check carrot_kombu tests integration benchmarks conftest.py
	$(PY) -m pytest
	$(PY) -m mypy
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

test-low-end: $(LOW_STAMP)
	$(LOW)/bin/python -m pytest -q $(LOW_TESTS) --ignore=tests/test_integrations.py

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

unit: $(STAMP)
	$(PY) -m pytest tests

integration: $(STAMP)
	$(PY) -m pytest integration

typecheck: $(STAMP)
	$(PY) -m mypy

lint: $(STAMP)
	$(PY) -m ruff check carrot_kombu tests integration benchmarks conftest.py

bench: $(STAMP)
	$(PY) -m benchmarks

report: $(STAMP)
	$(PY) -m integration.report

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(LOW) docs/_build .pytest_cache .mypy_cache
