# affect_nb — the two Quickstart commands are `make demo` and `make test`.
# Both create (once) a virtual environment in $(VENV) and install the package with its dev tools.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DATA ?= data/synthetic
TASKS ?= va expr au
DEMO ?= reports/demo

.PHONY: install demo test test-nbs test-py check export clean-nbs readme reports

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The main job: the experiment notebook on the built-in synthetic Aff-Wild2, once per task, into $(DEMO)/<task>/.
demo: export OMP_NUM_THREADS ?= 1
demo: install
	for t in $(TASKS); do \
	  mkdir -p $(DEMO)/$$t && \
	  $(BIN)/papermill nbs/experiments/train.ipynb $(DEMO)/$$t/train.ipynb --cwd nbs/experiments \
	    -f nbs/experiments/params/demo.yaml -p task $$t -p out_dir $(abspath $(DEMO))/$$t || exit 1; \
	done
	$(BIN)/python -c "import json,sys; [print(t, json.load(open('$(DEMO)/'+t+'/metrics.json'))['P']) for t in sys.argv[1:]]" $(TASKS)

test: install test-nbs test-py

# One torch thread per worker: two workers on two cores, no oversubscription.
test-nbs:
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2

test-py:
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --durations=10 tests

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

# The committed synthetic-data reports: every ablation study and the paper preset, quick mode, 3 seeds
# (19 min 46 s from a fresh clone on 2 CPU cores, the install included).
# REPORT_JOBS sets the runs in parallel and so the threads per run: keep it fixed for identical numbers.
REPORT_JOBS ?= 2
reports: install
	rm -rf reports/ablations reports/paper reports/registry.csv reports/registry.csv.lock
	mkdir -p reports/ablations reports/paper
	$(BIN)/papermill nbs/experiments/ablations.ipynb reports/ablations/ablations.ipynb -p study all -p quick True -p n_jobs $(REPORT_JOBS)
	$(BIN)/papermill nbs/experiments/paper.ipynb reports/paper/paper.ipynb -p quick True -y "seeds: [0]" -p n_jobs $(REPORT_JOBS)
