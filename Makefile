# Two commands matter: `make demo` (whole pipeline on synthetic data) and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DAGSTER_HOME := $(CURDIR)/.dagster_home
LANDING ?= data/landing
WORKDIR ?= data/work
PATIENTS ?= 1000
SEED ?= 7
UI_PORT ?= 3000
# pytest workers (pytest-xdist): one per core by default
TEST_WORKERS ?= auto

.PHONY: install test lint browser demo ui bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check pipelines fhirlake vault deid tests examples feature_repo
	$(BIN)/ruff format --check pipelines fhirlake vault deid tests feature_repo examples
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/mypy examples feature_repo

# The browser test drives Debian's chromium (never a downloaded browser): installed here when
# missing and apt-get is usable; otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    >/dev/null 2>&1; } || \
	  echo "chromium not installed (needs apt-get as root): tests/e2e/test_browser.py will skip"

test: lint browser
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

demo: install
	$(BIN)/ehr keys init
	$(BIN)/ehr generate --patients $(PATIENTS) --seed $(SEED) --out $(LANDING)/synthetic
	$(BIN)/ehr run --input $(LANDING) --workdir $(WORKDIR)
	@echo "Open the Dagster UI with: make ui   (then http://127.0.0.1:3000)"

# The landing sensor is off until turned on in the UI (Automation); release_automation is on.
ui: install
	EHR_LANDING=$(LANDING) EHR_WORKDIR=$(WORKDIR) \
	  $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(UI_PORT)

bench: install
	$(BIN)/ehr bench ingest --patients $(PATIENTS)

clean:
	rm -rf data .dagster_home/storage .dagster_home/history .dagster_home/schedules
