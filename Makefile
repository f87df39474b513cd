# One-command workflows. Each target creates/updates the pinned virtual environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extra pip arguments for the install, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_ARGS ?=

.PHONY: setup book test verify execute lab lint browser serve clean
.DEFAULT_GOAL := book

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(PIP_ARGS) -r requirements.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)                   ## create .venv with the pinned environment and bnutils (editable)

book: $(STAMP)                    ## build the HTML book from the stored notebook outputs
	$(BIN)/jupyter-book build . --all
	@echo "Open file://$(CURDIR)/_build/html/index.html"

test: $(STAMP)                    ## every check: lint, strict book build, unit + hygiene tests, nbval
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tools/run_checks.sh

verify: $(STAMP)                  ## re-run every chapter (or NB=chapters/X.ipynb) and compare with the stored outputs (nbval + tolerances)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tools/verify.sh $(NB)

execute: $(STAMP)                 ## re-execute every chapter in place (refresh stored outputs)
	$(BIN)/python tools/execute_notebooks.py $(NB)

lab: $(STAMP)                     ## open JupyterLab on the chapters, in the pinned environment (kernel: its Python)
	$(BIN)/jupyter lab --notebook-dir="$(CURDIR)" $(LAB_ARGS)

browser: $(STAMP)                 ## every page in headless Chromium (builds the HTML if stale); PNGs in screenshots/
	$(BIN)/python -m pytest -q tests/test_browser.py
	@echo "Screenshots: $(CURDIR)/screenshots/"

serve:                            ## serve _build/html on http://127.0.0.1:8000 (Ctrl-C stops it)
	$(BIN)/python -m http.server --bind 127.0.0.1 --directory _build/html 8000

lint: $(STAMP)
	$(BIN)/ruff check bnutils tests tools benchmarks chapters

clean:
	rm -rf _build screenshots
