# affect_nb — the two Quickstart commands are `make demo` and `make test`.
# Both create (once) a virtual environment in $(VENV) and install the package with its dev tools.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DATA ?= data/synthetic
TASKS ?= va expr au
DEMO ?= reports/demo

.PHONY: install browser demo test test-nbs test-py check export clean-nbs readme reports check-reports bench
# Playwright (a dev requirement) drives the system's Chromium: it never downloads a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD = 1

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

# -rs: each skipped test says why (tests/test_browser.py without Chromium).
test-py: browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -rs --durations=10 tests

# Chromium for tests/test_browser.py (the notebooks in JupyterLab, in a headless browser): Debian's package, installed with
# apt-get when it is missing and apt-get can be used (as root, or through sudo that asks no password). It never fails the
# build: without Chromium that test is skipped, and says so.
APT_CHROMIUM = env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then su=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then su="sudo -n"; \
	  else su=none; fi; \
	  if [ "$$su" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "make browser: no chromium and no usable apt-get: tests/test_browser.py will be skipped"; \
	  else \
	    echo "make browser: installing chromium with apt-get"; \
	    $$su $(APT_CHROMIUM) || { $$su apt-get update -qq && $$su $(APT_CHROMIUM); } || \
	      echo "make browser: apt-get could not install chromium: tests/test_browser.py will be skipped"; \
	  fi; }

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
# (20 min 35 s from a fresh clone on 2 CPU cores in the mode, the install included, with other jobs beside it.)
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

# The four benchmarks in one go, on BENCH_DEVICE (cpu, cuda, mps; auto: the best there is): the scale of the data path (to 1.65M
# frames), the training loop against a bare forward+backward (bf16 autocast on CUDA) and the attention kernels, and feature
# extraction and the video pipeline (decode, detect, crop, features) against the bare backbone. Each writes reports/bench/<name>_<device>.csv
# (and .png); on a lent GPU: make bench BENCH_DEVICE=cuda.
BENCH_DEVICE ?= auto
bench: install
	OMP_NUM_THREADS=1 $(BIN)/papermill nbs/experiments/bench_scale.ipynb reports/bench/bench_scale_$(BENCH_DEVICE).ipynb -p device $(BENCH_DEVICE)
	OMP_NUM_THREADS=1 $(BIN)/papermill nbs/experiments/bench_train.ipynb reports/bench/bench_train_$(BENCH_DEVICE).ipynb -p device $(BENCH_DEVICE)
	$(BIN)/papermill nbs/experiments/bench_features.ipynb reports/bench/bench_features_$(BENCH_DEVICE).ipynb --cwd . -p device $(BENCH_DEVICE)
	$(BIN)/papermill nbs/experiments/bench_video.ipynb reports/bench/bench_video_$(BENCH_DEVICE).ipynb --cwd . -p device $(BENCH_DEVICE)
