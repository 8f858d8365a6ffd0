"""Build the student notebooks `chapters/NN_slug.ipynb` from `solutions/NN_slug.ipynb`.

    python tools/build_chapters.py           # (re)write chapters/
    python tools/build_chapters.py --check   # exit 1 if chapters/ is not what a build would write

In a solution, exercise code sits between nbgrader's markers:

    def hebbian_update(W, k, v, lr):
        ### BEGIN SOLUTION
        return W + lr * torch.outer(v, k)
        ### END SOLUTION

A marker is a code line that starts (after indentation) with `### BEGIN SOLUTION` or
`### END SOLUTION`, whatever follows on the line. The chapter gets
`raise NotImplementedError("Exercise 1.1: <title>")` at the marker's indentation instead, the
cell is tagged `raises-exception` (nbval then accepts the error), the title comes from the
closest `### Exercise N.M: <title>` heading above the cell, outputs are stripped, and a Colab
badge cell opens the notebook. Every chapter is validated against the notebook format
(nbformat) before it is written.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import warnings
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
GITHUB_REPO = "engram-course/in-search-of-the-engram"   # change this line in a fork
# The release the notebooks belong to: the install cell pins its tag (v + pyproject's version), so
# a Colab user gets the library these notebooks were written for, not whatever main holds that day.
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"),
                    re.MULTILINE)[1]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# one pattern both finds the cells to strip and strips them, so no marker can be found but kept
MARKER = re.compile(r"^([ \t]*)### (BEGIN|END) SOLUTION\b.*$", re.MULTILINE)
EXERCISE_HEADING = re.compile(r"^#{2,4}\s*(Exercise\s+\d+\.\d+\s*:[^\n]*)", re.MULTILINE)
# a Think question's model answer, folded: <details><summary>A model answer</summary>(the answer)</details>
MODEL_ANSWER = re.compile(r"<details>\s*<summary>[^<]*model answer[^<]*</summary>(.*?)</details>[ \t]*\n?",
                          re.IGNORECASE | re.DOTALL)
BADGE_TAG = "colab-badge"

# The first code cell of every notebook, verbatim (a test checks it). It installs engramlib only
# when it cannot be imported (a fresh Colab runtime); pip then keeps Colab's torch and numpy.
SETUP_CELL = f"""# Setup (the same cell in every chapter): installs engramlib only if it is missing (Colab).
try:
    import engramlib
except ImportError:
    get_ipython().run_line_magic("pip", "install -q git+https://github.com/{GITHUB_REPO}@v{VERSION}")
    import engramlib
settings = engramlib.setup()"""


class MarkerError(ValueError):
    """A solution's markers are malformed (open block, END without BEGIN, no exercise heading)."""


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def strip_solutions(source: str, exercise: str) -> str:
    """Replace every BEGIN/END SOLUTION block in `source` with a NotImplementedError stub."""
    out, inside = [], False
    for number, line in enumerate(source.split("\n"), start=1):
        marker = MARKER.match(line)
        if marker and marker[2] == "BEGIN":
            if inside:
                raise MarkerError(f"line {number}: {BEGIN} inside an open block ({exercise})")
            inside = True
            out.append(f'{marker[1]}raise NotImplementedError("{exercise}")')
        elif marker:
            if not inside:
                raise MarkerError(f"line {number}: {END} without {BEGIN} ({exercise})")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{BEGIN} never closed with {END} ({exercise})")
    return "\n".join(out)


def badge_cell(path: Path) -> dict:
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/chapters/{path.name}"
    return {"cell_type": "markdown", "id": BADGE_TAG, "metadata": {"tags": [BADGE_TAG]},
            "source": f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"}


def build_notebook(solution: dict, path: Path) -> dict:
    """The chapter version of a solution notebook (a new dict; `solution` is not changed)."""
    nb = copy.deepcopy(solution)
    cells, exercise = [badge_cell(path)], None
    for cell in nb["cells"]:
        if BADGE_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        source = cell_source(cell)
        if cell["cell_type"] == "markdown":
            found = EXERCISE_HEADING.findall(source)
            exercise = found[-1].strip() if found else exercise
        elif cell["cell_type"] == "code":
            if MARKER.search(source):
                if exercise is None:
                    raise MarkerError(f"{path.name}: solution block before any "
                                      "'### Exercise N.M: title' heading")
                cell["source"] = strip_solutions(source, exercise)
                tags = cell.setdefault("metadata", {}).setdefault("tags", [])
                if "raises-exception" not in tags:
                    tags.append("raises-exception")
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    nb["cells"] = cells
    return nb


def dumps(nb: dict) -> str:
    """Serialize a notebook the way this repository stores them (stable, diff-friendly)."""
    for cell in nb["cells"]:
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def validate(text: str, name: str) -> None:
    """Raise ValueError unless `text` is a valid notebook (nbformat's schema, cell ids included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", nbformat.warnings.MissingIDFieldWarning)
        try:
            nbformat.validate(json.loads(text))
        except (nbformat.ValidationError, nbformat.warnings.MissingIDFieldWarning) as err:
            raise ValueError(f"chapters/{name} would not be a valid notebook: "
                             f"{getattr(err, 'message', err)}; fix solutions/{name}") from None


def expected_chapters(root: Path = ROOT) -> dict:
    """{chapter path: text a fresh build writes} for every notebook in solutions/ (validated)."""
    out = {}
    for sol in sorted((root / "solutions").glob("*.ipynb")):
        try:
            nb = build_notebook(json.loads(sol.read_text(encoding="utf-8")), sol)
        except MarkerError as err:
            raise MarkerError(f"{sol.name}: {err}") from None
        text = dumps(nb)
        validate(text, sol.name)
        out[root / "chapters" / sol.name] = text
    return out


def stale_chapters(root: Path = ROOT) -> list:
    """Chapter files that differ from a fresh build, are missing, or have no solution."""
    expected = expected_chapters(root)
    stale = [p for p, text in expected.items()
             if not p.exists() or p.read_text(encoding="utf-8") != text]
    stale += [p for p in (root / "chapters").glob("*.ipynb") if p not in expected]
    return sorted(stale)


def build(root: Path = ROOT) -> list:
    """Write chapters/ from solutions/; remove chapters without a solution. Returns written paths."""
    (root / "chapters").mkdir(exist_ok=True)
    expected = expected_chapters(root)
    for orphan in set((root / "chapters").glob("*.ipynb")) - set(expected):
        orphan.unlink()
    for path, text in expected.items():
        path.write_text(text, encoding="utf-8")
    return sorted(expected)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build chapters/ from solutions/.")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if chapters/ is stale")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_chapters(args.root)
        if stale:
            names = ", ".join(p.name for p in stale)
            print(f"chapters/ is stale ({names}): run python tools/build_chapters.py and commit")
            return 1
        print("chapters/ is in sync with solutions/")
        return 0
    for path in build(args.root):
        print(f"wrote {path.relative_to(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
