# Two commands for a fresh machine: `make demo` (real vLLM, real model, no GPU needed) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENGINE := .engines/cpu
STAMP := $(VENV)/.installed

.PHONY: all venv engine browser test test-fast test-integration test-sage lint demo bench docs completions gpu-carry clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import sage_llm, typer, psutil, httpx, pytest"
	touch $(STAMP)

venv: $(STAMP)

# the CPU build of vLLM in its own venv (git-ignored), recorded for the tests through SAGE_LLM_ENGINE_DIR
engine: $(STAMP)
	SAGE_LLM_HOME=$(CURDIR)/.engines/state $(BIN)/sage-llm engine install --cpu --ray --path $(CURDIR)/$(ENGINE)

# headless Chromium for the web panel's browser tests (tests/gateway/test_web_panel.py): Debian's `chromium` and
# `chromium-driver` packages, never a browser download. Installed when missing and we are root (or in CI, with sudo);
# elsewhere those tests skip with a message, and in CI (CI set) they fail instead.
browser:
	@if [ -n "$$SAGE_LLM_CHROMIUM" ] || [ -x /usr/bin/chromium ]; then :; \
	elif ! command -v apt-get >/dev/null; then echo "note: no apt-get: install Chromium yourself for the browser tests"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	elif [ -n "$$CI" ] && command -v sudo >/dev/null; then sudo apt-get update -qq && \
		sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "note: Chromium is absent: the web panel's browser tests will skip (apt-get install chromium chromium-driver)"; fi

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -m "not integration" -q

test-integration: engine
	SAGE_LLM_ENGINE_DIR=$(CURDIR)/$(ENGINE) $(BIN)/python -m pytest -m integration -q

test: engine browser
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	SAGE_LLM_ENGINE_DIR=$(CURDIR)/$(ENGINE) $(BIN)/python -m pytest -q

# only the tiers with SAGE's `sage` (also part of `make test`): the argparse stand-in and the published wheels from
# PyPI in throw-away venvs (about 2 min with a warm pip cache)
test-sage: $(STAMP)
	$(BIN)/python -m pytest -m venv -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

demo: $(STAMP)  # scripts/demo.sh installs the engine it needs: GPU when nvidia-smi sees one, else CPU
	bash scripts/demo.sh

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# shell completion scripts for `sage-llm` (bash, zsh, fish); tests/e2e/test_completion.py checks them
completions: $(STAMP)
	$(BIN)/python scripts/gen_completions.py

# docs/cli.md from the commands' help; tests/test_docs_current.py checks it
docs: $(STAMP)
	$(BIN)/python scripts/gen_cli_docs.py

# .gpu-carry/: sage-llm + dependencies for `bash scripts/gpu_check.sh` on a lent GPU machine (docs/gpu.md)
gpu-carry: $(STAMP)
	bash scripts/build_gpu_carry.sh

clean:
	rm -rf $(VENV) .engines .demo .pytest_cache .gpu-carry gpu-check-out
