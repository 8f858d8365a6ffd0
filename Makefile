# make lab   set up (once) and open the course in JupyterLab
# make test  set up (once) and run every test, notebooks included
#
# PYTHON      the interpreter that creates the venv (default python3)
# VENV        where the virtual environment lives (default .venv); VENV= uses the active
#             environment instead (conda: conda env create -f environment.yml; conda activate engram)
# TORCH_SPEC  how to install PyTorch (default torch>=2.1; CI pins a CPU build)
# LAB_ARGS    extra arguments for jupyter lab (e.g. --no-browser --port 8899)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.1
LAB_ARGS ?=
PY := $(if $(VENV),$(VENV)/bin/python,$(PYTHON))
STAMP := $(if $(VENV),$(VENV)/.engram-installed,.engram-installed)

.PHONY: setup lab test chapters clean

setup: $(STAMP)

$(STAMP): pyproject.toml
ifneq ($(VENV),)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
endif
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

lab: setup
	$(PY) -m jupyterlab chapters/ $(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_ARGS)

test: setup
	$(PY) -m pytest

chapters: setup
	$(PY) tools/build_chapters.py

clean:
	rm -rf $(VENV) .engram-installed
