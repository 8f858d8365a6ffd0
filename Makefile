# make lab     set up (once) and open the course in JupyterLab
# make test    set up (once) and run every test, notebooks included
#
# PYTHON       the interpreter that creates the venv (default python3)
# VENV         where the virtual environment lives (default .venv); VENV= uses the active
#              environment instead (conda: conda env create -f environment.yml; conda activate engram)
# TORCH_SPEC   which PyTorch to install (default torch>=2.1; CI pins torch==2.13.0)
# TORCH_INDEX  where pip looks for it, e.g. https://download.pytorch.org/whl/cpu for a CPU-only
#              build (no CUDA wheels); empty (default): PyPI
# LAB_ARGS     extra arguments for jupyter lab (e.g. --no-browser --port 8899)
# PYTEST_ARGS  extra arguments for pytest (e.g. PYTEST_ARGS="--durations=20" or "-n 0" for one process)
# SOLUTIONS    make book: 1 (default) publishes the solutions folded under each exercise, 0 the student
#              edition (no exercise code, no model answers)
# CHAPTERS     make book / assignments / test-book / test-grading: only these chapters, e.g. CHAPTERS=01,02
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.1
TORCH_INDEX ?=
LAB_ARGS ?=
PYTEST_ARGS ?=
SOLUTIONS ?= 1
CHAPTERS ?=
PY := $(if $(VENV),$(VENV)/bin/python,$(PYTHON))
STAMP := $(if $(VENV),$(VENV)/,)
TORCH_FROM := $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)",)

.PHONY: setup setup-test setup-lab lab test test-browser test-standin test-plans chapters clean \
	book assignments test-book test-grading

setup: setup-test setup-lab
setup-test: $(STAMP).engram-test
setup-lab: $(STAMP).engram-lab

$(STAMP).engram-torch:
ifneq ($(VENV),)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
endif
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_FROM)
	touch $@

# the course's own dependencies: torch is already there, so pip keeps the build chosen above
$(STAMP).engram-%: pyproject.toml $(STAMP).engram-torch
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

lab: setup-lab
	$(PY) -m jupyterlab chapters/ $(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_ARGS)

# one worker per core (pytest-xdist), one thread each; --dist loadscope keeps every notebook's
# cells on one worker and in order (nbval's advice for parallel runs). The test sets what it needs
# itself: the FAST sizes, and ENGRAM_MODEL unset, so every notebook takes the default path a user
# takes (TinyWorld on a machine without a large GPU), whatever the calling shell exports.
test: setup-test
	env -u ENGRAM_MODEL -u ENGRAM_SMOKE ENGRAM_FAST=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
	$(PY) -m pytest -n auto --dist loadscope $(PYTEST_ARGS)

# JupyterLab in headless Chromium (Debian: apt-get install chromium; or CHROMIUM=/path/to/chrome):
# runs chapters 01 and 07, moves a slider, presses Edit; screenshots in browser-screenshots/
test-browser: setup-test setup-lab $(STAMP).engram-browser
	ENGRAM_BROWSER_TESTS=1 $(PY) -m pytest tests/browser -v $(PYTEST_ARGS)

# every solution notebook on a small random GPT-2 in a local folder (not TinyWorld), with CounterFact,
# known_1000 and the Wikipedia paragraphs for C served from tests/fixtures/standin through the cache
test-standin: setup-test
	rm -rf .standin && $(PY) tools/standin.py .standin
	ENGRAM_MODEL=$(CURDIR)/.standin/model ENGRAM_CACHE=$(CURDIR)/.standin/cache ENGRAM_FAST=1 HF_HUB_OFFLINE=1 \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest solutions -n auto --dist loadscope $(PYTEST_ARGS)

# the memory and time plans (engramlib.budget) against measurements: heavy steps at their real sizes
# on a random GPT-2-small-shaped model on this CPU, its speed measured in the same run; fails when
# a step's time or memory is off its plan by more than 30 % (run it alone: nothing else on the cores)
test-plans: setup-test
	OMP_NUM_THREADS=1 $(PY) benchmarks/plan_vs_measured.py --tolerance 0.3

# the notebooks' kernels as in `make test`: FAST sizes, the model unset (TinyWorld on a CPU)
NOTEBOOK_ENV := env -u ENGRAM_MODEL -u ENGRAM_SMOKE ENGRAM_FAST=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
	$(if $(CHAPTERS),CHAPTERS=$(CHAPTERS),)

# the course as a static HTML site (Sphinx + MyST-NB), every notebook executed on TinyWorld at the FAST
# sizes: _build/book/html/index.html; SOLUTIONS=0: _build/book/html-student/ (no exercise code)
book: setup-test $(STAMP).engram-book
	$(NOTEBOOK_ENV) $(PY) tools/build_book.py $(if $(filter 0,$(SOLUTIONS)),--no-solutions,)

# nbgrader course folder _build/assignments/: source/ (tests, hidden tests, model answers) and release/
assignments: setup-test $(STAMP).engram-grading
	$(NOTEBOOK_ENV) $(PY) tools/build_assignments.py

# builds both editions of the book, checks pages, figures and links, and opens four pages in Chromium
# (-s: the execution times and the grades are printed)
test-book: setup-test $(STAMP).engram-book $(STAMP).engram-browser
	$(NOTEBOOK_ENV) ENGRAM_BOOK_TESTS=1 $(PY) -m pytest tests/book -v -s $(PYTEST_ARGS)

# grades solutions, untouched releases and wrong submissions with nbgrader (ENGRAM_GRADE_CHAPTERS:
# which chapters, default 01,02,07; "all" for every chapter)
test-grading: setup-test $(STAMP).engram-grading
	$(NOTEBOOK_ENV) ENGRAM_GRADING_TESTS=1 $(PY) -m pytest tests/grading -v -s $(PYTEST_ARGS)

chapters: setup-test
	$(PY) tools/build_chapters.py

clean:
	rm -rf $(VENV) .engram-torch .engram-test .engram-lab .engram-browser
