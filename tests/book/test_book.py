"""The course book (`make test-book`): tools/build_book.py builds both editions, then every chapter
has a page with its figures, the links inside the site resolve, nothing is loaded from outside, and
the student edition holds no exercise code and no model answer.

How figures are counted. In this course a figure reaches the page in one way: a code cell calls
`plt.show()` (matplotlib's inline backend then shows the figure the cell drew; each figure-drawing
cell draws one figure and shows it once). So a chapter's page must have one <img> per `plt.show()`
call in its code cells (counted in the parsed code, comments and strings excluded), plus one per
image in its markdown (`![...](...)` or `<img>`). Figures that widgets draw (the interactive
explorers) exist only with a kernel: the book shows a note instead, and they are not counted. A
`plt.show()` inside a loop or function would show a figure per run: the executed notebook's image
outputs are compared cell by cell with the count first, so such a cell is named if it ever appears.

The build executes the notebooks once (cached by tools/build_book.py in _build/book/executed/, shared
with `make book`); CHAPTERS="01,02" builds a part of the book."""
import ast
import html
import json
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402
from build_chapters import MARKER, cell_source  # noqa: E402

OUT = Path(os.environ.get("ENGRAM_BOOK_OUT", ROOT / "_build" / "book"))
CHAPTERS = build_book.notebooks(only=os.environ.get("CHAPTERS") or None)


def shows_in(code: str) -> int:
    """How many times a cell's code calls plt.show() / pyplot.show()."""
    try:
        tree = ast.parse(code)
    except SyntaxError:             # IPython magics: drop the lines that start with % or !
        tree = ast.parse("\n".join(l for l in code.split("\n") if not l.lstrip().startswith(("%", "!"))))
    return sum(1 for node in ast.walk(tree)
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "show"
               and isinstance(node.func.value, ast.Name) and node.func.value.id in ("plt", "pyplot"))


def markdown_images(text: str) -> int:
    return len(re.findall(r"!\[[^\]]*\]\([^)]*\)", text)) + len(re.findall(r"<img\b", text))


def expected_figures(nb: dict) -> int:
    return sum(shows_in(cell_source(c)) if c["cell_type"] == "code" else markdown_images(cell_source(c))
               for c in nb["cells"] if c["cell_type"] in ("code", "markdown"))


def article(page: str) -> str:
    """The page's main content (the theme's navigation and logo are not the chapter's)."""
    m = re.search(r'<article class="bd-article"[^>]*>(.*)</article>', page, re.DOTALL)
    assert m, "no <article> in the page"
    return m[1]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.resources = [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key):
                self.refs.append((tag, key, a[key]))
        if (tag in ("img", "script") and a.get("src")) or (tag == "link" and a.get("rel") in ("stylesheet", "preload", "icon")):
            self.resources.append(a.get("src") or a.get("href"))


def parse(path: Path) -> Links:
    p = Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_every_chapter_has_a_page_with_its_title(site):
    assert CHAPTERS, "no notebook in solutions/"
    for nb_path in CHAPTERS:
        page = site / (nb_path.stem + ".html")
        assert page.exists(), f"no page for {nb_path.name}"
        title = next(cell_source(c) for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "markdown")
        heading = html.escape(title.split("\n")[0].lstrip("# ").strip(), quote=False)
        assert heading in page.read_text(encoding="utf-8"), f"{page.name}: title {heading!r} missing"
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "In Search of the Engram" in index and "Quickstart" in index, "the README is the front page"
    for nb_path in CHAPTERS:
        assert f'href="{nb_path.stem}.html"' in index, f"the front page links to {nb_path.stem}"


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_each_page_has_as_many_figures_as_the_chapter_draws(site, nb_path):
    solution = json.loads(nb_path.read_text(encoding="utf-8"))
    executed = json.loads((OUT / "executed" / nb_path.name).read_text(encoding="utf-8"))
    for src, run in zip(solution["cells"], executed["cells"]):
        if any(build_book.is_explorer(o) for o in run.get("outputs", [])):
            continue                    # an explorer: the page shows a note instead of its outputs
        if src["cell_type"] == "code":
            images = sum("image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {})
                         for o in run.get("outputs", []))
            assert images == shows_in(cell_source(src)), (
                f"{nb_path.name}, cell {src.get('id')}: {shows_in(cell_source(src))} plt.show() calls but "
                f"{images} figures in its output")
    page = article((site / (nb_path.stem + ".html")).read_text(encoding="utf-8"))
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert len(imgs) == expected_figures(solution), (
        f"{nb_path.stem}: {len(imgs)} <img> on the page, the chapter draws {expected_figures(solution)}")
    for img in imgs:
        src = re.search(r'src="([^"]+)"', img)[1]
        assert not src.startswith(("http:", "https:", "//")), f"external image {src}"
        assert (site / unquote(src)).stat().st_size > 1000, f"{src} is missing or empty"


def check_site_links(root: Path):
    pages = sorted(root.rglob("*.html"))
    parsed = {p: parse(p) for p in pages}
    broken, external = [], []
    for page, links in parsed.items():
        if "_static" in page.parts:
            continue
        for tag, key, ref in links.refs:
            parts = urlsplit(ref)
            if parts.scheme in ("mailto", "javascript", "data"):
                continue
            if parts.scheme or ref.startswith("//"):
                if ref in links.resources:
                    external.append(f"{page.name}: {ref}")
                continue                     # links to other sites (Colab, papers) are not checked
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(root)}: {ref}")
            elif parts.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else parse(target).ids
                if parts.fragment not in ids:
                    broken.append(f"{page.relative_to(root)}: {ref} (no id {parts.fragment!r})")
    return broken, external


def test_no_broken_internal_links_and_nothing_loaded_from_outside(site):
    broken, external = check_site_links(site)
    assert not broken, f"{len(broken)} broken links: {broken[:10]}"
    assert not external, f"loaded from outside the site: {external[:10]}"
    assert (site / "_static" / "mathjax" / "MathJax.js").exists(), "MathJax is served from the site"


def test_solutions_are_folded_away_under_each_exercise(site):
    """Each exercise's code cell is folded ("Show the solution"); the Think questions' model answers
    stay folded in their <details>."""
    for nb_path in CHAPTERS:
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        exercises = sum(1 for c in nb["cells"] if c["cell_type"] == "code" and MARKER.search(cell_source(c)))
        page = (site / (nb_path.stem + ".html")).read_text(encoding="utf-8")
        folded = len(re.findall(r'<details class="[^"]*\bhide above-input', page))
        assert folded == exercises, f"{nb_path.stem}: {folded} folded cells, {exercises} exercises"
        answers = sum(len(build_book.MODEL_ANSWER.findall(cell_source(c))) for c in nb["cells"]
                      if c["cell_type"] == "markdown")
        assert len(re.findall(r"<details>\s*<summary>[^<]*model answer", page, re.IGNORECASE)) == answers, nb_path.stem


def page_text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


def printed(cell: dict) -> str:
    """The text a code cell printed (e.g. a colleague's buggy code that an exercise shows)."""
    texts = [o.get("text", "") if o.get("output_type") == "stream" else o.get("data", {}).get("text/plain", "")
             for o in cell.get("outputs", [])]
    return "\n".join("".join(t) if isinstance(t, list) else t for t in texts)


def test_student_edition_has_no_exercise_code_and_no_model_answers(student_site):
    broken, external = check_site_links(student_site)
    assert not broken and not external, (broken[:5], external[:5])
    for nb_path in CHAPTERS:
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        raw = (student_site / (nb_path.stem + ".html")).read_text(encoding="utf-8")
        text = page_text(student_site / (nb_path.stem + ".html"))
        assert "NotImplementedError" in text or not any(MARKER.search(cell_source(c)) for c in nb["cells"])
        assert not re.search(r"<summary>[^<]*model answer", raw, re.IGNORECASE), \
            f"{nb_path.stem}: a model answer is published"
        executed = json.loads((OUT / "executed" / nb_path.name).read_text(encoding="utf-8"))
        # what a student sees anyway: the chapter's code, and what its other cells print
        student = "\n".join([cell_source(c) for c in
                              json.loads((ROOT / "chapters" / nb_path.name).read_text(encoding="utf-8"))["cells"]]
                             + [printed(c) for c in executed["cells"] if not build_book.is_exercise_cell(c)])
        for cell in nb["cells"]:
            if cell["cell_type"] != "code" or not MARKER.search(cell_source(cell)):
                continue
            inside = False
            for line in cell_source(cell).split("\n"):
                if MARKER.match(line):
                    inside = not inside
                elif inside and len(line.strip()) > 15 and line.strip() not in student:
                    assert line.strip() not in text, f"{nb_path.stem}: solution code published: {line.strip()!r}"
