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
    out = {}
    for module in sorted((ROOT / "engramlib" / "checks").glob("*.py")):
        for node in ast.parse(module.read_text(encoding="utf-8")).body:
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


@pytest.mark.parametrize("path", SOLUTIONS + [ROOT / "README.md"], ids=lambda p: p.name)
def test_numbers_next_to_chapter_names_are_the_chapters_numbers(path):
    """'06 causal tracing' in a course map must be chapter 06's number (catches a missed renumbering)."""
    text = path.read_text(encoding="utf-8") if path.suffix == ".md" else markdown(path)
    for p in SOLUTIONS:
        words = p.stem[3:].replace("_", "[ -]")
        for number in re.findall(rf"\b(\d\d) {words}\b", text, flags=re.IGNORECASE):
            assert number == p.name[:2], f"{path.name} calls {p.stem[3:]} chapter {number}, it is {p.name[:2]}"


def _solution_lines(path: Path) -> set:
    """Lines of code between the solution markers, whitespace-normalised (trivial lines dropped)."""
    lines, inside = set(), False
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        for line in src.splitlines():
            if "BEGIN SOLUTION" in line:
                inside = True
            elif "END SOLUTION" in line:
                inside = False
            elif inside:
                norm = " ".join(line.split())
                if len(norm.replace(" ", "")) >= 10 and not norm.startswith("#"):
                    lines.add(norm)
                    lines.add(norm.removeprefix("return "))                 # the expression returned
                    if re.match(r"^[\w, \[\]]+ = ", norm):
                        lines.add(norm.split(" = ", 1)[1])                  # the right-hand side
    return {line for line in lines if len(line.replace(" ", "")) >= 10}


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_hints_do_not_contain_the_solutions_code(path):
    solution = _solution_lines(path)
    for block in re.findall(r"<details>(.*?)</details>", markdown(path), flags=re.S):
        pieces = block.splitlines() + re.findall(r"`([^`\n]+)`", block)      # lines and inline code
        for piece in pieces:
            norm = " ".join(piece.strip().strip("`").split())
            assert norm not in solution, f"{path.name}: a hint gives away the solution's {norm!r}"
