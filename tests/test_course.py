"""The course hangs together: chapter numbers, titles, README rows, cross-references and exercise
numbers agree with the files (so a renumbering cannot leave a stale "chapter 05" behind)."""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
NUMBERS = {p.name[:2] for p in SOLUTIONS}


def markdown(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join(c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                     for c in cells if c["cell_type"] == "markdown")


def test_solutions_and_chapters_have_the_same_numbered_snake_case_names():
    assert [p.name for p in SOLUTIONS] == sorted(p.name for p in (ROOT / "chapters").glob("*.ipynb"))
    for p in SOLUTIONS:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", p.name), p.name
    assert len(NUMBERS) == len(SOLUTIONS), "two notebooks share a number"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_title_and_exercise_numbers_match_the_file(path):
    text = markdown(path)
    number = int(path.name[:2])
    assert re.search(rf"^# {path.name[:2]} · ", text, re.MULTILINE), f"{path.name}: title must start with '# {path.name[:2]} · '"
    for n in re.findall(r"#{2,4}\s*Exercise\s+(\d+)\.\d+", text):
        assert int(n) == number, f"{path.name} has an 'Exercise {n}.x' heading"


@pytest.mark.parametrize("path", SOLUTIONS + [ROOT / "README.md"], ids=lambda p: p.name)
def test_chapter_references_point_at_existing_chapters(path):
    text = path.read_text(encoding="utf-8") if path.suffix == ".md" else markdown(path)
    for ref in re.findall(r"[Cc]hapters? (\d\d)\b", text):
        assert ref in NUMBERS, f"{path.name} mentions chapter {ref}, which does not exist"
    for link in re.findall(r"\((?:chapters|solutions)/([^)#]+\.ipynb)", text):
        assert (ROOT / "chapters" / link).exists(), f"{path.name} links to a missing {link}"


def test_readme_lists_every_chapter_with_its_number_and_badge():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for p in SOLUTIONS:
        row = next((line for line in readme.splitlines() if f"(chapters/{p.name})" in line), None)
        assert row is not None, f"README's course table has no row for {p.name}"
        assert row.startswith(f"| {p.name[:2]} |"), f"README row for {p.name} has the wrong number"
        assert f"blob/main/chapters/{p.name})" in row, f"README's Colab badge for {p.name} is missing or wrong"


def _check_numbers():
    """{check function name: 'N.M'} from the 'Exercise N.M' in each check's docstring."""
    tree = ast.parse((ROOT / "engramlib" / "checks.py").read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            m = re.match(r"Exercise (\d+\.\d+)", ast.get_docstring(node) or "")
            if m:
                out[node.name] = m.group(1)
    return out


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_each_exercise_calls_the_check_with_its_number(path):
    """The check called right after 'Exercise N.M' says 'Exercise N.M' in its docstring."""
    numbers = _check_numbers()
    heading = None
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            found = re.findall(r"#{2,4}\s*Exercise\s+(\d+\.\d+)", src)
            heading = found[-1] if found else heading
            continue
        for name in re.findall(r"checks\.(\w+)\(", src):
            if name in numbers and heading is not None:
                assert numbers[name] == heading, (f"{path.name}: exercise {heading} calls checks.{name}, "
                                                  f"whose docstring says Exercise {numbers[name]}")
