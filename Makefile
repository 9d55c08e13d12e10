# affect_nb — the two Quickstart commands are `make demo` and `make test`.
# Both create (once) a virtual environment in $(VENV) and install the package with its dev tools.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DATA ?= data/synthetic

.PHONY: install demo test test-nbs test-py check export clean-nbs readme reports

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

demo: install
	$(BIN)/affect-synth $(DATA) --summary

test: install test-nbs test-py

test-nbs:
	$(BIN)/nbdev_test --n_workers 2

test-py:
	$(BIN)/python -m pytest -n 2 tests

export:
	$(BIN)/nbdev_export

clean-nbs:
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_clean --fname nbs/experiments

readme:
	$(BIN)/jupyter nbconvert --to markdown nbs/index.ipynb --output README --output-dir . --log-level WARN

# Fails when the exported package, the cleaned notebooks or README.md differ from what is committed.
check: install export clean-nbs readme
	git diff --exit-code --stat -- affect_nb nbs README.md
	test -z "$$(git status --porcelain --untracked-files=all -- affect_nb)"
