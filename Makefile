# affect_nb — the two Quickstart commands are `make demo` and `make test`.
# Both create (once) a virtual environment in $(VENV) and install the package with its dev tools.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DATA ?= data/synthetic
TASKS ?= va expr au
DEMO ?= reports/demo

.PHONY: install demo test test-nbs test-py check export clean-nbs readme reports check-reports

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

# The reproducible mode (affect_nb.utils.reproducible_env): torch's kernels at AVX2, MKL's COMPATIBLE code path, oneDNN at
# AVX2, one thread, set before any torch starts: the same numbers on any x86-64 CPU with AVX2 (README, "Reproducible numbers").
REPRODUCIBLE = $(shell $(BIN)/python -c "from affect_nb.utils import reproducible_env; print(*(f'{k}={v}' for k, v in reproducible_env().items()))")

# The committed synthetic-data reports: every ablation study and the paper preset, quick mode, 3 seeds, in the reproducible
# mode, with a feature cache of their own (features and the shared backbone made in the mode, never ones made without it).
# (19 min 46 s from a fresh clone on 2 CPU cores without the mode, the install included; the mode makes a run slower.)
# REPORT_JOBS sets only how many runs go at once: in the mode each has one thread, so the numbers do not depend on it.
REPORT_JOBS ?= 2
REPORT_CACHE ?= data/features-reproducible
reports: install
	rm -rf reports/ablations reports/paper reports/registry.csv reports/registry.csv.lock
	mkdir -p reports/ablations reports/paper
	env $(REPRODUCIBLE) $(BIN)/papermill nbs/experiments/ablations.ipynb reports/ablations/ablations.ipynb -p study all -p quick True \
	  -p n_jobs $(REPORT_JOBS) -p cache_dir $(REPORT_CACHE)
	env $(REPRODUCIBLE) $(BIN)/papermill nbs/experiments/paper.ipynb reports/paper/paper.ipynb -p quick True -y "seeds: [0]" \
	  -p n_jobs $(REPORT_JOBS) -p cache_dir $(REPORT_CACHE)

# Reruns CHECK_RUNS committed runs (one per sweep, spread over reports/registry.csv, with their recorded parameters) in the
# reproducible mode in a temporary folder, features included, and prints each committed P, new P and difference; fails
# when any differs at all (tolerance 0: in the mode the same kernels give the same bits on any CPU with AVX2).
CHECK_RUNS ?= 5
check-reports: install
	$(BIN)/python -m affect_nb.reproduce reports/registry.csv --runs $(CHECK_RUNS) --jobs $(REPORT_JOBS)
