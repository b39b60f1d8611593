# Two commands on a fresh machine:
#   make up     install into .venv and start the whole system on embedded defaults
#   make test   install into .venv and run every test (what .ci/run runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TOOLS  := tools/node_modules/.installed

.PHONY: up test tools bench check-specs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# npm tools of the contract tests (TypeScript client, docs UI sources), pinned by
# tools/package-lock.json; Debian's chromium + node/npm when missing.
$(TOOLS): tools/package.json tools/package-lock.json
	scripts/ensure-test-tools.sh
	cd tools && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(TOOLS)

tools: $(TOOLS)

up: $(STAMP)
	$(BIN)/qmtl up $(ARGS)

test: $(STAMP) $(TOOLS)
	$(BIN)/ruff check .
	$(BIN)/mypy qmtl handlers
	scripts/ensure-services.sh
	scripts/ensure-test-tools.sh
	$(BIN)/qmtl check-specs
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	scripts/ensure-services.sh
	command -v wrk >/dev/null || apt-get install -y wrk || sudo apt-get install -y wrk
	$(BIN)/python bench/run.py $(ARGS)

check-specs: $(STAMP)
	$(BIN)/qmtl check-specs

clean:
	rm -rf $(VENV) .qmtl .pytest_cache
