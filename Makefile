# One-command workflows. Each target creates/updates the pinned virtual environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup book test execute lint clean
.DEFAULT_GOAL := book

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)                   ## create .venv with the pinned environment and bnutils (editable)

book: $(STAMP)                    ## build the HTML book from the stored notebook outputs
	$(BIN)/jupyter-book build . --all
	@echo "Open file://$(CURDIR)/_build/html/index.html"

test: $(STAMP)                    ## every check: lint, strict book build, unit + hygiene tests, nbval
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tools/run_checks.sh

execute: $(STAMP)                 ## re-execute every chapter in place (refresh stored outputs)
	$(BIN)/python tools/execute_notebooks.py $(NB)

lint: $(STAMP)
	$(BIN)/ruff check bnutils tests tools benchmarks chapters

clean:
	rm -rf _build
