"""Grade the assignments with the real nbgrader (no mocks): `make test-grading`.

For each chapter graded, tools/build_assignments.py writes the source and release notebooks, then
four kinds of submission are autograded by `nbgrader autograde` at the FAST sizes (nbgrader executes
each one top to bottom, hidden tests restored):
- solutions: the release with every solution cell filled in from solutions/ -> full marks;
- untouched: the release as students get it -> 0 points on the exercises;
- wrong: the solutions with the first exercise's answer replaced by `pass` (the function returns
  None, a classic slip) -> every point but that exercise's;
- tamper (the first chapter graded only): the wrong answer, plus the student overwrites the check
  they can see so that it always prints ✓ -> the visible check passes, the hidden one fails: the same
  points as `wrong`, and `nbgrader generate_feedback` tells the student that the hidden test failed
  without showing its code.

Grading executes notebooks (20-90 s a chapter at the FAST sizes on 2 cores), so by default this grades
ENGRAM_GRADE_CHAPTERS="01,02,07": the two toy-memory chapters (pure functions, seconds) and ROME
(checks that run GPT-2-shaped code on TinyWorld, the course's hardest exercise ●●●●), three of the
four fastest chapters to execute; "all" grades every chapter in solutions/ (about three times the
book's execution time). Each chapter has its own course folder (its own gradebook), so chapters
are graded in parallel, one per core.
"""
import json
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import build_assignments as BA  # noqa: E402
from build_chapters import MARKER, cell_source  # noqa: E402

pytest.importorskip("nbgrader")
SELECTED = os.environ.get("ENGRAM_GRADE_CHAPTERS") or os.environ.get("CHAPTERS") or "01,02,07"
CHAPTERS = BA.chapters(None if SELECTED.strip() == "all" else SELECTED)
KINDS = ("solutions", "untouched", "wrong")


def solution_code(source: str) -> str:
    """A solved cell as a student would leave it: the solution code, without the markers."""
    return "\n".join(line for line in source.split("\n") if not MARKER.match(line))


def wrong_code(source: str) -> str:
    """The first solution block replaced by `pass` at its indentation (a function returns None)."""
    out, inside, done = [], False, False
    for line in source.split("\n"):
        marker = MARKER.match(line)
        if marker and marker[2] == "BEGIN" and not done:
            inside = True
            out.append(f"{marker[1]}pass  # wrong on purpose: the answer is missing")
        elif marker and inside:
            inside, done = False, True
        elif marker:
            continue
        elif not inside:
            out.append(line)
    return "\n".join(out)


def submission(release: dict, source: dict, kind: str) -> dict:
    """A submitted notebook built from the release notebook (ids and metadata as students get them)."""
    nb = json.loads(json.dumps(release))
    if kind == "untouched":
        return nb
    solutions = {c["id"]: cell_source(c) for c in source["cells"]
                 if c.get("metadata", {}).get("nbgrader", {}).get("solution") and c["cell_type"] == "code"}
    tests = [c for c in source["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade")
             and c["cell_type"] == "code"]
    first = next(iter(solutions))
    for cell in nb["cells"]:
        if cell.get("id") in solutions:
            code = solutions[cell["id"]]
            cell["source"] = wrong_code(code) if kind in ("wrong", "tamper") and cell["id"] == first \
                else solution_code(code)
            if kind == "tamper" and cell["id"] == first:
                names = re.findall(r"^checks\.(\w+)\(", cell_source(tests[0]), re.MULTILINE)
                cell["source"] += "\n\n# make the visible check always pass\n" + "\n".join(
                    f'checks.{n} = lambda *args, **kwargs: print("✓ {n} passed")' for n in names)
    return nb


def grade_chapter(path: Path, root: Path, tamper: bool) -> dict:
    """Build, release, submit, autograde and write feedback for one chapter in its own course
    folder. Returns {kind: (autograded score, autograded maximum)} and the feedback's paths."""
    from nbgrader.api import Gradebook

    course = root / path.stem
    name = path.stem
    BA.build(course, only=name[:2])
    release = json.loads((course / "release" / name / path.name).read_text(encoding="utf-8"))
    source = json.loads((course / "source" / name / path.name).read_text(encoding="utf-8"))
    kinds = KINDS + (("tamper",) if tamper else ())
    for kind in kinds:
        folder = course / "submitted" / kind / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).write_text(json.dumps(submission(release, source, kind), ensure_ascii=False),
                                        encoding="utf-8")
    BA.nbgrader(course, "autograde", name, "--create", "--force")
    BA.nbgrader(course, "generate_feedback", name, "--force")
    scores = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for kind in kinds:
            nb = gb.find_submission_notebook(name, name, kind)
            auto = [g for g in nb.grades if g.cell.cell_type == "code"]
            scores[kind] = (sum(g.score for g in auto), sum(g.max_score for g in auto))
    first_test = next(c for c in source["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade")
                      and c["cell_type"] == "code")
    return {"scores": scores, "course": course, "first_points": first_test["metadata"]["nbgrader"]["points"],
            "feedback": {k: course / "feedback" / k / name / path.with_suffix(".html").name for k in kinds}}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    if not CHAPTERS:
        pytest.skip("no chapter to grade")
    root = tmp_path_factory.mktemp("courses")
    env = {"ENGRAM_FAST": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    saved = {k: os.environ.get(k) for k in list(env) + ["ENGRAM_MODEL", "ENGRAM_SMOKE"]}
    os.environ.update(env)                      # the kernels nbgrader starts inherit this
    os.environ.pop("ENGRAM_MODEL", None)
    os.environ.pop("ENGRAM_SMOKE", None)
    try:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            futures = {p.stem: pool.submit(grade_chapter, p, root, i == 0) for i, p in enumerate(CHAPTERS)}
            results = {name: f.result() for name, f in futures.items()}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print("\nautograded points (score / maximum):")
    for name, r in results.items():
        print(f"  {name}: " + ", ".join(f"{k} {s:g}/{m:g}" for k, (s, m) in r["scores"].items()))
    return results


@pytest.mark.parametrize("chapter", [p.stem for p in CHAPTERS])
def test_solutions_get_full_marks(graded, chapter):
    score, maximum = graded[chapter]["scores"]["solutions"]
    assert maximum > 0 and score == maximum, f"{chapter}: solutions scored {score}/{maximum}"


@pytest.mark.parametrize("chapter", [p.stem for p in CHAPTERS])
def test_untouched_release_gets_zero(graded, chapter):
    score, maximum = graded[chapter]["scores"]["untouched"]
    assert score == 0, f"{chapter}: the untouched release scored {score}/{maximum}"


@pytest.mark.parametrize("chapter", [p.stem for p in CHAPTERS])
def test_one_wrong_answer_loses_that_exercise_only(graded, chapter):
    score, maximum = graded[chapter]["scores"]["wrong"]
    assert 0 < score < maximum, f"{chapter}: a wrong submission should get partial marks, got {score}/{maximum}"
    assert score == maximum - graded[chapter]["first_points"], (chapter, score, maximum)


def test_hidden_test_catches_a_patched_check_and_feedback_reports_it_without_its_code(graded):
    first = graded[CHAPTERS[0].stem]
    assert first["scores"]["tamper"] == first["scores"]["wrong"], first["scores"]
    html = first["feedback"]["tamper"].read_text(encoding="utf-8")
    assert "hidden test failed" in html, "the student is told that the hidden test failed"
    for secret in (BA.HIDDEN_BEGIN, "_fresh", "import_module", "redirect_stdout"):
        assert secret not in html, f"the feedback shows the hidden test's code ({secret!r})"
    assert "hidden tests ran here" in html


def test_release_has_no_answers_and_no_hidden_tests(graded):
    for name, r in graded.items():
        release = (r["course"] / "release" / name / f"{name}.ipynb").read_text(encoding="utf-8")
        source = json.loads((ROOT / "solutions" / f"{name}.ipynb").read_text(encoding="utf-8"))
        assert BA.HIDDEN_BEGIN not in release and "BEGIN SOLUTION" not in release, name
        assert "model answer" not in release.lower(), f"{name}: a Think question's model answer is in the release"
        n_think = sum(len(BA.MODEL_ANSWER.findall(cell_source(c))) for c in source["cells"] if c["cell_type"] == "markdown")
        assert release.count("YOUR ANSWER HERE") == n_think, name
