# dalle-pipeline: `make demo` trains a text-to-image model end to end on the embedded shapes corpus;
# `make test` runs the quick tests (unit tests and one micro end-to-end flow, a few minutes),
# `make test-all` the quick and the slow tier (CI's), `make test-slow` the slow tier alone,
# `make test-quality` the tiny preset trained on the real corpus (OpenMoji). All install into
# .venv first (idempotent).
PYTHON ?= python3
VENV ?= $(CURDIR)/.venv
PY = $(VENV)/bin/python
PRESET ?= tiny
STAMP = $(VENV)/.installed
# no phoning home from Prefect, MLflow or Ray: the CLI, the flow and the tests set that themselves
# (components/environment.py), for a run started outside make too

.PHONY: install demo test test-slow test-all test-quality bench clean real-corpus

# torch first, pinned: pip takes 2.14.1/0.29.1 from this machine's disk; the project's ranges then
# admit them, so nothing is downloaded again. img2dataset drags in the `dataclasses` backport,
# which shadows the standard library in subprocesses (Prefect's ephemeral server dies on it).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip uninstall -y -q dataclasses || true
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dalle-pipeline train --preset $(PRESET)

# pyproject's addopts deselect `slow` and `quality`; a later -m replaces it
test: install
	$(PY) -m pytest -q

test-slow: install real-corpus
	$(PY) -m pytest -q -m "slow and not quality"

test-all: install real-corpus
	$(PY) -m pytest -q -m "not quality" --durations=15

# not in CI: the tiny preset trained on OpenMoji (25 minutes on the AVX2-only CPU kind before #15 cut
# the preset's updates; CI's 90 minutes hold the shapes run, tests/flows/test_quality.py, not both)
test-quality: install real-corpus
	$(PY) -m pytest -q -m quality -s

# the slow tier's real corpus (tests/real_corpus.py): OpenMoji's emoji, as the npm registry ships them
OPENMOJI_VERSION = 17.0.0
real-corpus: .cache/openmoji-$(OPENMOJI_VERSION).tgz
.cache/openmoji-$(OPENMOJI_VERSION).tgz:
	mkdir -p .cache
	cd .cache && npm pack --silent openmoji@$(OPENMOJI_VERSION) >/dev/null

bench: install
	$(PY) bench/prior.py
	$(PY) bench/sample.py
	$(PY) bench/dvae.py
	$(PY) bench/download.py

clean:
	rm -rf runs

# a root on an object store (s3://...) is passed on as it is: infra/env.sh keeps the services' files in its cache
ROOT ?= $(if $(DALLE_HOME),$(if $(findstring ://,$(DALLE_HOME)),$(DALLE_HOME),$(abspath $(DALLE_HOME))),$(CURDIR)/runs)
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
PREFECT_POOL ?= dalle-pool
SERVE_ENV = DALLE_HOME=$(ROOT) VENV=$(VENV) PREFECT_PORT=$(PREFECT_PORT) MLFLOW_PORT=$(MLFLOW_PORT) PREFECT_POOL=$(PREFECT_POOL)

.PHONY: serve stop ui
# The Prefect server runs on SQLite under $(ROOT) unless PREFECT_DATABASE_URL names a PostgreSQL
# database (`make serve PREFECT_DATABASE_URL=postgresql+asyncpg://...`; make passes it on as it is).
serve:
	$(SERVE_ENV) infra/serve.sh

stop:
	$(SERVE_ENV) infra/stop.sh

# `mlflow ui` is `mlflow server` in MLflow 3. Flows write artifacts as local files under
# $(ROOT)/mlartifacts, which the UI reads in place; --default-artifact-root keeps experiments the UI
# creates there too (not at mlflow-artifacts:/). No job runner: it is 8 processes for GenAI jobs.
ui:
	@case "$(ROOT)" in *://*) echo "make ui: the root $(ROOT) is an object store; make serve starts its MLflow UI" \
		"(store and logs in the root's local cache)" >&2; exit 1;; esac
	mkdir -p $(ROOT)/mlartifacts
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--workers 1 --backend-store-uri sqlite:///$(ROOT)/mlflow.db \
		--default-artifact-root $(ROOT)/mlartifacts --artifacts-destination $(ROOT)/mlartifacts
