# Everything a fresh machine needs, from a clean clone: `make demo`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The low end of the supported range (setup.cfg: amqp>=5.2, kombu>=5.3): the
# library's suite runs there too, against the fenced py-amqp layer.
LOW ?= .venv-low
LOW_PINS := "amqp==5.2.0" "kombu==5.3.7" "vine==5.0.0" "backoff==2.2.1" "pytest>=7" "hypothesis>=6" "pytest-xdist>=3" \
	"matplotlib>=3.5" "prometheus_client>=0.17" "opentelemetry-api>=1.20" "opentelemetry-sdk>=1.20" "pytest-asyncio>=0.23"
LOW_STAMP := $(LOW)/.installed-stamp
# (the unit suite drives the fenced py-amqp layer through a scripted fake broker;
# the two integration modules take it to the real broker, within CI's time budget)
LOW_INTEGRATION := integration/test_core.py integration/test_isolation_property.py
# Celery is not installed there (no Celery release pins amqp 5.2 / kombu 5.3.7 / vine 5.0):
# the unit tests that drive a Celery app run on the newest versions only.
LOW_SKIP := --ignore=tests/test_integrations.py --ignore=tests/test_celery_fakebroker.py \
	--deselect "tests/test_transport_fakebroker.py::test_the_managers_heartbeat_is_what_the_application_chose"
# The unit suite mostly waits (heartbeats, deadlines, a fake broker's pauses):
# its modules run in parallel worker processes.  Integration tests share the
# broker and start private nodes: they run one at a time.
UNIT_WORKERS ?= 8

.PHONY: demo test test-high test-low-end test-slow unit integration typecheck lint docs bench report package clean

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
	$(PY) -m pytest tests -n $(UNIT_WORKERS)
	$(PY) -m pytest integration --durations=15
	$(PY) -m mypy
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	$(MAKE) package

test-low-end: $(LOW_STAMP)
	$(LOW)/bin/python -m pytest -q tests -n $(UNIT_WORKERS) $(LOW_SKIP)
	$(LOW)/bin/python -m pytest -q $(LOW_INTEGRATION)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

unit: $(STAMP)
	$(PY) -m pytest tests -n $(UNIT_WORKERS)

integration: $(STAMP)
	$(PY) -m pytest integration --durations=15

typecheck: $(STAMP)
	$(PY) -m mypy

lint: $(STAMP)
	$(PY) -m ruff check carrot_kombu tests integration benchmarks conftest.py

bench: $(STAMP)
	$(PY) -m benchmarks

report: $(STAMP)
	$(PY) -m integration.report

# The sdist and the wheel, built from a clean copy (build's isolated env) into
# build/dist (never the repo root), then checked as PyPI would render them.
DIST := build/dist
package: $(STAMP)
	rm -rf $(DIST)
	$(PY) -m build --outdir $(DIST) .
	$(PY) -m twine check --strict $(DIST)/*
	$(PY) -c "$$SDIST_CHECK" $(DIST)/*.tar.gz

# Fails on any sdist member outside the package and the top-level texts (junk).
define SDIST_CHECK
import sys, tarfile
allowed = {"LICENSE", "CHANGELOG.md", "README.md", "PKG-INFO", "setup.cfg", "pyproject.toml", "MANIFEST.in"}
with tarfile.open(sys.argv[1]) as sdist:
    names = [m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name]
junk = [n for n in names if n not in allowed and n.split("/")[0] not in ("carrot_kombu", "carrot_kombu.egg-info")]
missing = {"LICENSE", "CHANGELOG.md"} - set(names)
sys.exit(f"sdist junk {junk} / missing {sorted(missing)}" if junk or missing else None)
endef
export SDIST_CHECK

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(LOW) docs/_build .pytest_cache .mypy_cache
