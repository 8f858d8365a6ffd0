"""The path a user takes: ENGRAM_MODEL unset (the README's default, and Colab's). Chapters 03 and 04
choose their model through `budget.model_for_chapter(chapter, settings.model_name)`; with the
variable unset that name is None, which once crashed their model cell in both versions. Chapters
05-11 ask `budget.plan(chapter, settings.model_name)` for their model and sizes the same way."""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

RUN_CELLS = r"""
import json, sys
from unittest import mock
import torch
torch.set_num_threads(1)
for notebook, cells in json.loads(sys.argv[1]).items():
    namespace = {"get_ipython": mock.MagicMock()}          # a fresh kernel for each notebook
    for source in cells:
        exec(compile(source, notebook, "exec"), namespace)
    print("MODEL", notebook, namespace["mt"].name)
"""
NOTEBOOKS = ["solutions/03_skill_grafting.ipynb", "solutions/04_forget_free_learning.ipynb",
             "chapters/03_skill_grafting.ipynb", "chapters/04_forget_free_learning.ipynb",
             *(f"solutions/{p.name}" for p in sorted((ROOT / "solutions").glob("*.ipynb"))
               if "budget.plan(" in p.read_text())]          # the chapters that print their plan


def model_cells(notebook: Path) -> list:
    """The setup cell and the cells up to and including the one that loads `mt`."""
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) for c in cells]
    end = next(i for i, s in enumerate(sources) if "model_for_chapter(" in s or "budget.plan(" in s)
    return sources[:end + 1]


def test_chapters_load_a_model_with_the_variable_unset():
    """Both versions of chapters 03 and 04, and every chapter that prints its plan, setup cell to
    model cell, in a process without ENGRAM_MODEL and without a GPU: each loads TinyWorld."""
    assert len(NOTEBOOKS) >= 4 + 7
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_MODEL"}
    env.update(ENGRAM_SMOKE="1", CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    cells = {nb: model_cells(ROOT / nb) for nb in NOTEBOOKS}
    out = subprocess.run([sys.executable, "-c", RUN_CELLS, json.dumps(cells)], cwd=ROOT / "solutions",
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for nb in NOTEBOOKS:
        assert f"MODEL {nb} tinyworld" in out.stdout, out.stdout


def test_make_test_runs_the_users_path():
    """`make test` leaves the model unset and sets the FAST sizes itself; CI exports nothing."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\ntest: "):].split("\n\n")[0]
    assert "-u ENGRAM_MODEL" in recipe and "ENGRAM_FAST=1" in recipe
    ci_code = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert any("make test " in line for line in ci_code)
    assert not any("export" in line or "ENGRAM_" in line for line in ci_code)
