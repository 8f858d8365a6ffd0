"""The chapter builder: markers become stubs, everything else is left alone, and the repo is in sync."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_chapters as bc  # noqa: E402


def notebook(*cells):
    return {"cells": list(cells), "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


_ids = iter(range(10 ** 6))


def md(text):
    return {"cell_type": "markdown", "id": f"md-{next(_ids)}", "metadata": {}, "source": text}


def code(text, outputs=None):
    return {"cell_type": "code", "id": f"code-{next(_ids)}", "metadata": {}, "source": text,
            "outputs": outputs or [], "execution_count": 3 if outputs else None}


SOLVED = ("def f(x):\n"
          "    \"\"\"doc\"\"\"\n"
          "    ### BEGIN SOLUTION\n"
          "    y = x + 1\n"
          "    return y\n"
          "    ### END SOLUTION\n"
          "\n"
          "check(f)")


def build(*cells):
    return bc.build_notebook(notebook(*cells), Path("01_demo.ipynb"))


def test_block_becomes_stub_at_marker_indentation_and_cell_is_tagged():
    nb = build(md("### Exercise 1.2: add one (● 5 min)"), code(SOLVED))
    cell = nb["cells"][-1]
    assert cell["source"] == ("def f(x):\n    \"\"\"doc\"\"\"\n"
                              "    raise NotImplementedError(\"Exercise 1.2: add one (● 5 min)\")\n"
                              "\ncheck(f)")
    assert "raises-exception" in cell["metadata"]["tags"]


def test_several_blocks_in_one_cell_and_top_level_block():
    src = ("a = 1\n### BEGIN SOLUTION\nb = 2\n### END SOLUTION\n"
           "def g():\n        ### BEGIN SOLUTION\n        return 3\n        ### END SOLUTION\n")
    nb = build(md("## Exercise 2.1: two blocks"), code(src))
    out = nb["cells"][-1]["source"]
    assert out == ('a = 1\nraise NotImplementedError("Exercise 2.1: two blocks")\n'
                   'def g():\n        raise NotImplementedError("Exercise 2.1: two blocks")\n')


def test_markdown_and_plain_code_untouched_outputs_stripped():
    text = "# Title\n\nSome *prose* with ### BEGIN SOLUTION inside markdown."
    plain = code("print(1)", outputs=[{"output_type": "stream", "name": "stdout", "text": "1\n"}])
    nb = build(md(text), plain)
    assert nb["cells"][1]["source"] == text
    assert nb["cells"][2]["source"] == "print(1)"
    assert nb["cells"][2]["outputs"] == [] and nb["cells"][2]["execution_count"] is None
    assert "tags" not in nb["cells"][2]["metadata"]


def test_badge_cell_first_and_build_is_idempotent():
    nb = build(md("### Exercise 1.1: x"), code(SOLVED))
    assert "colab.research.google.com" in nb["cells"][0]["source"]
    assert "chapters/01_demo.ipynb" in nb["cells"][0]["source"]
    again = bc.build_notebook(nb, Path("01_demo.ipynb"))
    assert bc.dumps(again) == bc.dumps(nb)


def test_exercise_title_is_the_closest_heading_above():
    nb = build(md("### Exercise 1.1: first"), code("x = 1"), md("### Exercise 1.2: second"),
               code(SOLVED))
    assert 'NotImplementedError("Exercise 1.2: second")' in nb["cells"][-1]["source"]


def test_markers_with_trailing_text_are_stripped_too():
    """nbgrader reads a line that starts with the marker as a marker, whatever follows it; the
    solution must not ship to students."""
    src = ("def f(x):\n    ### BEGIN SOLUTION  # note for authors\n    return x + 1  # secret\n"
           "    ### END SOLUTION (keep it short)\n")
    nb = build(md("### Exercise 1.3: with notes"), code(src))
    cell = nb["cells"][-1]
    assert cell["source"] == 'def f(x):\n    raise NotImplementedError("Exercise 1.3: with notes")\n'
    assert "secret" not in cell["source"] and "raises-exception" in cell["metadata"]["tags"]


def test_a_chapter_that_is_not_a_valid_notebook_is_not_written(tmp_path):
    (tmp_path / "solutions").mkdir()
    bad = code("print(1)")
    del bad["id"]                                    # nbformat 4.5 requires cell ids
    (tmp_path / "solutions" / "01_x.ipynb").write_text(json.dumps(notebook(md("# x"), bad)))
    with pytest.raises(ValueError, match="01_x.ipynb would not be a valid notebook"):
        bc.build(tmp_path)
    text = {**md("# x"), "execution_count": 1}       # markdown cells have no execution count
    (tmp_path / "solutions" / "01_x.ipynb").write_text(json.dumps(notebook(text, code("x = 1"))))
    with pytest.raises(ValueError, match="would not be a valid notebook.*execution_count"):
        bc.main(["--root", str(tmp_path), "--check"])
    assert not list((tmp_path / "chapters").glob("*.ipynb"))


@pytest.mark.parametrize("src, message", [
    ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n### END SOLUTION\n", "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside an open block"),
])
def test_malformed_markers_raise_clear_errors(src, message):
    with pytest.raises(bc.MarkerError, match=message):
        build(md("### Exercise 1.1: x"), code(src))


def test_solution_block_without_exercise_heading_is_an_error():
    with pytest.raises(bc.MarkerError, match="Exercise N.M"):
        build(code(SOLVED))


def test_check_detects_a_stale_chapter(tmp_path):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions" / "01_x.ipynb").write_text(
        json.dumps(notebook(md("### Exercise 1.1: x"), code(SOLVED))))
    assert bc.main(["--root", str(tmp_path), "--check"]) == 1        # chapters/ missing
    bc.build(tmp_path)
    assert bc.main(["--root", str(tmp_path), "--check"]) == 0
    sol = tmp_path / "solutions" / "01_x.ipynb"
    sol.write_text(sol.read_text().replace("check(f)", "check(f, 2)"))   # edit without rebuilding
    assert bc.main(["--root", str(tmp_path), "--check"]) == 1


def test_repository_chapters_are_a_fresh_build_of_solutions():
    stale = bc.stale_chapters(ROOT)
    assert not stale, (f"chapters/ differs from a fresh build of solutions/ for "
                       f"{[p.name for p in stale]}: run `python tools/build_chapters.py` and commit")


def all_notebooks():
    return sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "chapters").glob("*.ipynb"))


@pytest.mark.parametrize("path", all_notebooks(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebooks_are_committed_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, (f"{path.name} has outputs in cells {dirty}: clear them "
                       "(Jupyter: Edit > Clear Outputs of All Cells) and save")


@pytest.mark.parametrize("path", sorted((ROOT / "solutions").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_notebook_starts_with_the_shared_setup_cell(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert bc.cell_source(first_code) == bc.SETUP_CELL, (
        f"{path.name}: the first code cell must be tools/build_chapters.SETUP_CELL, verbatim")


def test_the_book_keeps_a_figure_drawn_next_to_progress_bars_and_hides_explorers():
    import build_book
    widget = "application/vnd.jupyter.widget-view+json"
    bar = {"output_type": "display_data", "metadata": {},
           "data": {widget: {"model_id": "a"}, "text/plain": ["memit, batches of 4:   0%|          | 0/2"]}}
    figure = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}}
    explorer = {"output_type": "display_data", "metadata": {}, "data": {widget: {"model_id": "b"},
                                                                         "text/plain": "VBox(children=(...))"}}
    nb = notebook(code("run()\nplt.show()", [bar, bar, figure]), code("explore()", [explorer, figure]))
    page = build_book.page_notebook(nb, solutions=True)
    assert page["cells"][0]["outputs"] == [figure]                     # bars dropped, the figure kept
    assert page["cells"][1]["outputs"][0]["text"] == build_book.WIDGET_NOTE + "\n"
    assert len(page["cells"][1]["outputs"]) == 1
