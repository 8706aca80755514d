# klime — `make demo` and `make test` work on a fresh machine: each creates .venv itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test check check-durations test-lowest test-urllib3-range test-noaws lint bench soak clean venv dev test-matrix

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip
	$(PIP) install -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PIP) install -e ".[dev]"
	touch $@

venv: $(VENV)/.base
dev: $(VENV)/.dev

## Runs the quick start against the embedded local collector and shows what arrived.
demo: $(VENV)/.base
	$(PY) -m klime.devserver --port 0 -- $(PY) examples/quickstart.py

## The whole suite (slow real-server matrices included), then lint and types.
test: $(VENV)/.dev
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory lint

## The edit-test loop (issue 21): the unit tests, then lint and types, in well under a minute.
## Leaves out the real-server suites (uWSGI, gunicorn, Celery, the Lambda emulator, the AWS
## end-to-end run, soaks, benchmarks, the stateful machines, the spooled transport's process
## matrix, the typed examples' mypy runs) and each test listed in tools/check-deselect.txt: those
## of 0.2 s or more, measured by `make check-durations`. `make test` still runs everything.
CHECK_SLOW_FILES := \
  tests/test_uwsgi.py tests/test_gunicorn.py tests/test_celery.py tests/test_examples_celery.py \
  tests/test_lambda_emulator.py tests/test_aws_e2e.py tests/test_soak.py tests/test_benchmarks.py \
  tests/test_stateful.py tests/test_transports_spooled.py tests/test_examples_typed.py
CHECK_PYTEST_ARGS := $(addprefix --ignore=,$(CHECK_SLOW_FILES)) -m "not slow and not soak"

check: $(VENV)/.dev
	$(PY) -m pytest -q $(CHECK_PYTEST_ARGS) @tools/check-deselect.txt
	$(MAKE) --no-print-directory lint

## Re-measures which tests `make check` leaves out (runs every test that check may run, once).
check-durations: $(VENV)/.dev
	$(PY) -m pytest -q --durations=0 $(CHECK_PYTEST_ARGS) > $(VENV)/check-durations.txt || true
	$(PY) tools/check_select.py $(VENV)/check-durations.txt
	rm -f $(VENV)/check-durations.txt

## The suite with every runtime dependency at the LOWEST version pyproject.toml declares
## (tools/lowest.py: requests, urllib3, boto3, and botocore from tools/lowest-constraints.txt),
## in its own venv; fails if pip installed anything else than those floors.
LOWEST ?= .venv-lowest
LOWEST_PY := $(LOWEST)/bin/python

$(LOWEST)/.installed: pyproject.toml tools/lowest.py tools/lowest-constraints.txt
	$(PYTHON) -m venv $(LOWEST)
	echo '*' > $(LOWEST)/.gitignore
	$(LOWEST_PY) -m pip --disable-pip-version-check -q install -U pip
	$(LOWEST_PY) tools/lowest.py constraints > $(LOWEST)/constraints.txt
	$(LOWEST_PY) -m pip --disable-pip-version-check -q install -c $(LOWEST)/constraints.txt -e ".[dev]"
	$(LOWEST_PY) -m pip --disable-pip-version-check check
	touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST_PY) tools/lowest.py check
	$(LOWEST_PY) -m pytest -q

## The HTTP sender and klime 1.x's programs on urllib3 2.0 and 2.6.2 (where klime 0.1 crashed:
## urllib3's Retry gained retry_after_max only in 2.6.3), each in its own venv; a minute.
URLLIB3_2 ?= 2.0.7 2.6.2
test-urllib3-range:
	set -e; for v in $(URLLIB3_2); do \
	  d=.venv-urllib3-$$v; \
	  [ -f $$d/.installed ] || { $(PYTHON) -m venv $$d && echo '*' > $$d/.gitignore && \
	    $$d/bin/python -m pip --disable-pip-version-check -q install -e ".[dev]" "urllib3==$$v" && touch $$d/.installed; }; \
	  $$d/bin/python -c "import urllib3, requests; print('urllib3', urllib3.__version__, 'requests', requests.__version__)"; \
	  $$d/bin/python -m pytest -q tests/test_senders_http.py tests/test_senders_http_hostile.py tests/test_compat_klime1.py; \
	done

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests benchmarks examples tools
	$(PY) -m mypy

## Benchmarks against segment-analytics-python and posthog, printed as ratios.
bench: $(VENV)/.dev
	$(PY) benchmarks/run.py

## Full-size soaks (100,000 events against a faulting collector; 60 s black hole; 4 gunicorn
## workers with the spool through a minute-long outage) and a scaled-up stateful run.
soak: $(VENV)/.dev
	KLIME_SOAK_EVENTS=100000 KLIME_SOAK_SECONDS=60 $(PY) -m pytest -q -s -rA -m "slow or soak" tests/test_soak.py
	KLIME_RUN_SOAK=1 $(PY) -m pytest -q -rA -m soak tests/test_transports_spooled.py
	KLIME_STATEFUL_RANDOM=1 KLIME_STATEFUL_EXAMPLES=300 KLIME_STATEFUL_STEPS=50 $(PY) -m pytest -q -s tests/test_stateful.py

## The suite without boto3/moto installed: the AWS tests skip, everything else runs.
test-noaws: $(VENV)/.dev
	$(PYTHON) -m venv .venv-noaws
	.venv-noaws/bin/python -m pip --disable-pip-version-check -q install -e ".[dev]"
	.venv-noaws/bin/python -m pip --disable-pip-version-check -q uninstall -y boto3 botocore s3transfer moto
	.venv-noaws/bin/python -m pytest -q

## The whole suite on every CPython that Debian's packages give this machine, one line each
## (docs/python-versions.md). Needs root; roots are cached in $$KLIME_MATRIX_CACHE
## (/var/cache/klime-matrix). Pick with MATRIX_ARGS="--only 3.13,3.13t".
test-matrix:
	$(PYTHON) tools/test_matrix.py $(MATRIX_ARGS)

clean:
	rm -rf $(VENV) .venv-noaws $(LOWEST) .venv-urllib3-* build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
