"""Build graded assignments for nbgrader from the solution notebooks.

    python tools/build_assignments.py                      # every chapter in solutions/
    python tools/build_assignments.py --chapters 01,02 --out _build/assignments

writes an nbgrader course folder (default `_build/assignments/`):

    nbgrader_config.py            the course's settings, with feedback that never shows hidden tests
    source/NN_slug/NN_slug.ipynb  the instructor's version (nbgrader metadata, answers, hidden tests)
    release/NN_slug/NN_slug.ipynb what students get (`nbgrader generate_assignment`, run here)

From each solution notebook:
- an exercise's code cell (the one with `### BEGIN SOLUTION`) becomes two cells: the student's
  solution cell (nbgrader replaces the marked code with `raise NotImplementedError()`) and a
  read-only autograded test cell with the exercise's check calls (`checks.<name>(...)`, the
  statements at the cell's top level). The test cell is worth the heading's difficulty in points
  (● 1, ●● 2, ●●● 3, ●●●● 4). Below the visible check, a hidden test (removed from the release,
  restored by `nbgrader autograde`) runs the same check from a fresh import of engramlib.checks,
  so a submission that replaced or patched the check it sees still fails.
- a Think question's model answer (`<details><summary>A model answer</summary>`) is cut from the
  question and becomes a manually graded answer cell (2 points): the source keeps the model answer
  for the graders, the release has "YOUR ANSWER HERE".

Hidden tests and feedback (nbgrader #869, #1363; otter-grader #383): `nbgrader generate_feedback`
normally renders the autograded notebook, hidden test code included. This course's
nbgrader_config.py adds a preprocessor to the feedback that replaces each hidden region with one
comment line and reduces the error output of a test cell to its last line ("AssertionError: hidden
test failed: ..."), so the student sees that the hidden test ran, failed and what it diagnosed, and
the points lost (nbgrader's per-cell score), but not the test's code (an IPython traceback would
print the hidden lines around the failing one).
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from build_chapters import EXERCISE_HEADING, MARKER, MODEL_ANSWER, cell_source  # noqa: E402

THINK_POINTS = 2
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"

# The hidden half of every test cell: the same checks from a fresh import of engramlib.checks (new
# module objects, read from the installed files), then the notebook's own modules put back, so the
# predictions recorded so far survive. Its output is swallowed; a failure says it was hidden.
HIDDEN_TEMPLATE = '''{begin}
import contextlib as _cl, importlib as _il, io as _io, sys as _sys
_saved = {{n: m for n, m in _sys.modules.items() if n.startswith("engramlib.checks")}}
for _n in _saved:
    del _sys.modules[_n]
try:
    _fresh = _il.import_module("engramlib.checks")
finally:
    _sys.modules.update(_saved)
    _sys.modules["engramlib"].checks = _saved.get("engramlib.checks", _fresh)
try:
    with _cl.redirect_stdout(_io.StringIO()):
{calls}
except Exception as _err:
    raise AssertionError(f"hidden test failed: {{type(_err).__name__}}: {{_err}}") from None
{end}'''

NBGRADER_CONFIG = '''"""nbgrader settings of the In Search of the Engram course (written by tools/build_assignments.py).

Run nbgrader from this folder: nbgrader generate_assignment NN_slug, nbgrader autograde NN_slug,
nbgrader generate_feedback NN_slug. Kernels inherit this shell's environment: export ENGRAM_FAST=1
to grade at the small sizes, and ENGRAM_MODEL if submissions should run on another model."""
import re

from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, Execute, GetGrades, IgnorePattern,
                                    LimitOutput, NbGraderPreprocessor, SaveAutoGrades)

c = get_config()  # noqa: F821 (nbgrader's config loader defines it)
c.CourseDirectory.root = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
c.Execute.timeout = 1800            # seconds per cell; the chapters' heaviest cells at full size


class ExecuteWithoutWidgets(Execute):
    """nbgrader's Execute, minus nbclient's imitation of a widget front-end (nbclient #312: a cell
    that shows an ipywidgets explorer sometimes never finishes). Grading needs no widget state; an
    explorer's output simply stays in its cell."""
    def handle_comm_msg(self, outs, msg, cell_index):
        pass


# nbgrader 0.9's autograde steps, with Execute replaced
c.Autograde.autograde_preprocessors = [ExecuteWithoutWidgets, IgnorePattern, ClearMetadataPreprocessor, LimitOutput,
                                       SaveAutoGrades, AssignLatePenalties, CheckCellMetadata]
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\\nraise NotImplementedError()"}


class HideHiddenTests(NbGraderPreprocessor):
    """Feedback shows that a hidden test ran and whether it failed, never its code (nbgrader #869):
    each hidden region becomes one comment, and a test cell's error output keeps only its last line
    ("AssertionError: hidden test failed: ..."): an IPython traceback prints the lines around the
    failing one, hidden ones included."""
    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and "{begin}" in cell.source:
            cell.source = re.sub(r"[ \\t]*{begin}.*?{end}[^\\n]*",
                                 "# hidden tests ran here when the notebook was graded (code not shown)",
                                 cell.source, flags=re.DOTALL)
            for output in cell.get("outputs", []):
                if output.output_type == "error":
                    output.traceback = [f"{{output.ename}}: {{output.evalue}}"]
        return cell, resources


c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTests, CSSHTMLHeaderPreprocessor]
'''.replace("{begin}", HIDDEN_BEGIN).replace("{end}", HIDDEN_END).replace("{{", "{").replace("}}", "}")


def difficulty(heading: str) -> int:
    """Points of an exercise: the number of ● in its heading (1 to 4); 1 when it has none."""
    return max(1, min(4, heading.count("●")))


def exercise_number(heading: str) -> str:
    m = re.search(r"Exercise\s+(\d+)\.(\d+)", heading)
    return f"{int(m[1]):02d}_{int(m[2])}" if m else "x"


def nbgrader_meta(grade_id: str, *, solution: bool, grade: bool, locked: bool, points: float = 0) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": False}
    if grade:
        meta["points"] = points
    return meta


def split_checks(source: str) -> tuple:
    """(solution part, [check statements]): the cell's top-level statements that call `checks.*`
    and lie outside the solution block move to the test cell; everything else stays."""
    tree = ast.parse(source)
    lines = source.split("\n")
    calls, drop = [], set()
    for node in tree.body:
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute) and isinstance(node.value.func.value, ast.Name)
                and node.value.func.value.id == "checks"):
            span = range(node.lineno - 1, node.end_lineno)
            if any(MARKER.match(lines[i]) for i in span):
                continue
            calls.append("\n".join(lines[i] for i in span))
            drop.update(span)
    kept = [line for i, line in enumerate(lines) if i not in drop]
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept), calls


def test_cell_source(calls: list) -> str:
    visible = "\n".join(calls)
    indented = "\n".join("        " + line for call in calls for line in call.split("\n"))
    hidden = HIDDEN_TEMPLATE.format(begin=HIDDEN_BEGIN, end=HIDDEN_END,
                                    calls="\n".join(line.replace("checks.", "_fresh.", 1) if line.lstrip().startswith("checks.")
                                                    else line for line in indented.split("\n")))
    return ("# Autograded test (read-only): run it to check your answer. When the notebook is graded,\n"
            "# a hidden test runs the same check again.\n" f"{visible}\n{hidden}")


def source_notebook(solution: dict, name: str) -> dict:
    """The nbgrader source version of a solution notebook (a new dict)."""
    nb = copy.deepcopy(solution)
    cells, heading, thinks = [], "", 0

    def markdown(text, cid, meta=None):
        cell = {"cell_type": "markdown", "id": cid, "metadata": {}, "source": text}
        if meta:
            cell["metadata"]["nbgrader"] = meta
        return cell

    for cell in nb["cells"]:
        cell.setdefault("metadata", {})
        tags = cell["metadata"].get("tags", [])
        if "colab-badge" in tags:
            continue
        source = cell_source(cell)
        if cell["cell_type"] == "markdown":
            found = EXERCISE_HEADING.findall(source)
            heading = found[-1] if found else heading
            parts = MODEL_ANSWER.split(source)        # text, answer, text, answer, ..., text
            if len(parts) == 1:
                cells.append(cell)
                continue
            for i, part in enumerate(parts):
                if i % 2 == 0:
                    text = part.strip("\n")
                    if i + 1 < len(parts):
                        text += (f"\n\n*Write your answer in the next cell ({THINK_POINTS} points, graded by hand).*")
                    if text.strip():
                        cells.append(markdown(text, f"{cell['id']}-{i // 2}"))
                else:
                    thinks += 1
                    cells.append(markdown(part.strip("\n") + "\n", f"{cell['id']}-answer{i // 2}",
                                          nbgrader_meta(f"think-{thinks}", solution=True, grade=True,
                                                        locked=False, points=THINK_POINTS)))
        elif cell["cell_type"] == "code" and MARKER.search(source):
            number = exercise_number(heading)
            code, calls = split_checks(source)
            cell["source"] = code
            cell["outputs"], cell["execution_count"] = [], None
            cell["metadata"]["nbgrader"] = nbgrader_meta(f"ex{number}-solution-{cell['id']}", solution=True,
                                                         grade=False, locked=False)
            cells.append(cell)
            if not calls:
                print(f"  warning: {name}, exercise {number.replace('_', '.')}: no checks.*(...) call in its cell, "
                      "so no autograded test (put the check in the exercise's cell)")
            if calls:
                cells.append({"cell_type": "code", "id": f"{cell['id']}-test", "execution_count": None,
                              "outputs": [], "source": test_cell_source(calls),
                              "metadata": {"nbgrader": nbgrader_meta(
                                  f"ex{number}-test-{cell['id']}", solution=False, grade=True, locked=True,
                                  points=difficulty(heading))}})
        else:
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
            cells.append(cell)
    nb["cells"] = cells
    return nb


def points(nb: dict) -> dict:
    """{"auto": points of the autograded tests, "manual": points graded by hand}."""
    auto = manual = 0
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade"):
            if cell["cell_type"] == "code":
                auto += meta["points"]
            else:
                manual += meta["points"]
    return {"auto": auto, "manual": manual}


def chapters(only: str | None = None) -> list:
    paths = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {n.strip().zfill(2) for n in only.split(",") if n.strip()}
        paths = [p for p in paths if p.name[:2] in wanted]
    return paths


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the nbgrader command line in a course folder; raise with its output if it fails."""
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    run = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, capture_output=True, text=True,
                         env=env)       # nbgrader runs `alembic` from PATH: the environment's bin/ first
    if run.returncode:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
    return run


def check_config(course: Path) -> None:
    """Load the course's nbgrader_config.py as nbgrader does. nbgrader only logs a config file that
    fails to load and goes on with its defaults, which would show the hidden tests in the feedback."""
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config()
    steps = config.GenerateFeedback.preprocessors
    if not any(getattr(p, "__name__", "") == "HideHiddenTests" for p in steps):
        raise RuntimeError(f"{course}/nbgrader_config.py does not hide the hidden tests in the feedback")


def build(out: Path, only: str | None = None, release: bool = True) -> list:
    """Write the course folder; returns the assignment names."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "nbgrader_config.py").write_text(NBGRADER_CONFIG, encoding="utf-8")
    check_config(out)
    names = []
    for path in chapters(only):
        nb = source_notebook(json.loads(path.read_text(encoding="utf-8")), path.stem)
        folder = out / "source" / path.stem
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / path.name).write_text(json.dumps(nb, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        names.append(path.stem)
        pts = points(nb)
        print(f"  {path.stem}: {pts['auto']:g} point{'' if pts['auto'] == 1 else 's'} autograded, "
              f"{pts['manual']:g} graded by hand")
    if release:
        for name in names:
            nbgrader(out, "generate_assignment", name, "--force")
        print(f"released {len(names)} assignments in {out}/release/")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build nbgrader assignments from solutions/.")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "assignments")
    parser.add_argument("--chapters", default=os.environ.get("CHAPTERS") or None,
                        help='only these chapters, e.g. "01,02" (default: every notebook in solutions/)')
    args = parser.parse_args(argv)
    build(args.out.resolve(), args.chapters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
