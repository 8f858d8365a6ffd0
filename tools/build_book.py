"""Build the course as a static HTML book: Sphinx + MyST-NB + sphinx-book-theme (what Jupyter Book 1
builds on), with every notebook executed on TinyWorld at the FAST sizes.

    python tools/build_book.py                  # solutions published, answers folded away
    python tools/build_book.py --no-solutions   # the same site without exercise code or model answers
    python tools/build_book.py --jobs 2 --out _build/book

Steps:
1. execute every notebook in solutions/ (whichever chapters exist) with nbclient, one kernel per
   job, ENGRAM_FAST=1 and ENGRAM_MODEL unset (the default path: TinyWorld on a CPU). Executed
   notebooks are cached in <out>/executed/, keyed by the notebook, engramlib's sources and the
   FAST settings, so a second build (or `--no-solutions` after a full build) executes nothing.
2. stage a Sphinx source folder: README.md as the front page (badge images replaced by text links,
   links into chapters/ pointed at the chapter pages), INSTRUCTORS.md when it exists, one page per
   executed notebook. With solutions, each exercise's code cell is folded under "Show the solution"
   (its output, the check's ✓, stays visible); without, the cell is the student's stub (the code
   between the solution markers replaced as tools/build_chapters.py does), its output dropped, and
   the Think questions' model answers removed. Widget outputs (interactive explorers) need a
   running kernel: the page says so instead.
3. sphinx-build with book/conf.py: MathJax served from the site (jupyter-server-mathjax's copy, no
   CDN), no external image, script or stylesheet.

Why Sphinx + MyST-NB (+ sphinx-book-theme), the stack of Jupyter Book 1, and not Jupyter Book 2
(mystmd): all of it installs from PyPI as pure Python and builds with no network. Jupyter Book 2 is a
Node.js application that downloads its site template (the book theme, an archive) the first time it
builds, which a class's or CI's closed network cannot do; and MathJax for Sphinx comes from PyPI too
(jupyter-server-mathjax, maintained by the Jupyter project, ships MathJax 2.7 and its web fonts).
Execution is ours (nbclient, what MyST-NB itself uses) so that the notebooks run in parallel, once for
both editions, and a failing chapter names itself.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from build_chapters import GITHUB_REPO, MARKER, MODEL_ANSWER, cell_source, strip_solutions, EXERCISE_HEADING  # noqa: E402

BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\(([^)]*)\)")
CHAPTER_LINK = re.compile(r"\[([^\]]*)\]\((?:\.\./)?(?:chapters|solutions)/([0-9]{2}_[a-z0-9_]+)\.ipynb\)")
MODEL_ANSWER_BLOCK = re.compile(r"\n?" + MODEL_ANSWER.pattern, MODEL_ANSWER.flags)   # with the line before
RELATIVE_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(#[^)\s]*)?\)")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PROGRESS_BAR = re.compile(r"\d+%\|")
WIDGET_NOTE = ("(An interactive explorer is shown here when the notebook runs in Jupyter or Colab; "
               "the static book cannot run it.)")


def notebooks(root: Path = ROOT, only: str | None = None) -> list:
    """The solution notebooks that exist now (chapters being written may be missing); `only`:
    a comma-separated list of chapter numbers ("01,02") to build a part of the book."""
    paths = sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {n.strip().zfill(2) for n in only.split(",") if n.strip()}
        paths = [p for p in paths if p.name[:2] in wanted]
    return paths


def kernel_env() -> dict:
    """The environment of the kernels: FAST sizes, the model unset (the user's default path)."""
    env = dict(os.environ, ENGRAM_FAST="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               MPLBACKEND="module://matplotlib_inline.backend_inline", PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for name in ("ENGRAM_MODEL", "ENGRAM_SMOKE"):
        env.pop(name, None)
    return env


def cache_key(nb_path: Path) -> str:
    """What an executed notebook depends on: its own text, engramlib's sources, the settings."""
    h = hashlib.sha256(nb_path.read_bytes())
    for p in sorted((ROOT / "engramlib").rglob("*.py")):
        h.update(str(p.relative_to(ROOT)).encode() + p.read_bytes())
    h.update(b"ENGRAM_FAST=1;model=default")
    return h.hexdigest()


def _widgetless_client():
    from nbclient import NotebookClient

    class WidgetlessClient(NotebookClient):
        """nbclient without its imitation of a widget front-end (nbclient #312: a cell that shows an
        ipywidgets explorer sometimes never finishes). The book cannot run widgets anyway."""
        def handle_comm_msg(self, outs, msg, cell_index):
            pass
    return WidgetlessClient


def execute(nb_path: str, out_path: str, timeout: int = 1200) -> float:
    """Run one notebook top to bottom in a fresh kernel; write it with its outputs. Returns seconds.
    A cell that raises fails the build unless it is tagged raises-exception (nbclient's rule)."""
    import nbformat

    WidgetlessClient = _widgetless_client()
    start = time.time()
    os.environ.clear()
    os.environ.update(kernel_env())
    nb = nbformat.read(nb_path, as_version=4)
    run_dir = Path(out_path).with_suffix(".run")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)            # the kernel's working folder: files a chapter writes land here
    WidgetlessClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}},
                     store_widget_state=False).execute()
    nbformat.write(nb, out_path)
    shutil.rmtree(run_dir, ignore_errors=True)
    return time.time() - start


def execute_all(paths: list, cache: Path, jobs: int) -> dict:
    """{name: executed notebook path}; executes only what the cache does not hold."""
    cache.mkdir(parents=True, exist_ok=True)
    todo, done = [], {}
    for p in paths:
        out, key = cache / p.name, cache_key(p)
        done[p.name] = out
        key_file = out.with_suffix(".key")
        if out.exists() and key_file.exists() and key_file.read_text() == key:
            print(f"  {p.name}: executed copy is up to date")
        else:
            todo.append((p, out, key_file, key))
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(execute, str(p), str(out)): (p, key_file, key) for p, out, key_file, key in todo}
            failed = []
            for future, (p, key_file, key) in futures.items():
                try:
                    seconds = future.result()
                    key_file.write_text(key)
                    print(f"  {p.name}: executed in {seconds:.0f} s")
                except Exception as err:        # report every failing chapter, then stop
                    failed.append(f"{p.name}: {type(err).__name__}: {str(err)[-2000:]}")
            if failed:
                raise SystemExit("notebooks failed to execute:\n" + "\n".join(failed))
    return done


def is_progress_bar(output: dict) -> bool:
    """A tqdm progress bar, which Jupyter shows as a widget (its text: "name:  40%|████  | 2/5 [...]")."""
    data = output.get("data", {})
    text = data.get("text/plain", "")
    return WIDGET_MIME in data and bool(PROGRESS_BAR.search("".join(text) if isinstance(text, list) else text))


def is_explorer(output: dict) -> bool:
    """An interactive widget other than a progress bar: the static book shows a note instead."""
    return WIDGET_MIME in output.get("data", {}) and not is_progress_bar(output)


def is_exercise_cell(cell: dict) -> bool:
    return cell["cell_type"] == "code" and bool(MARKER.search(cell_source(cell)))


def page_notebook(nb: dict, solutions: bool, pages: set = frozenset()) -> dict:
    """The book's version of an executed solution notebook (a new dict). `pages`: the notebook
    names of the book (links to them stay links between pages)."""
    nb = copy.deepcopy(nb)
    nb["metadata"].pop("widgets", None)
    cells, exercise = [], None
    for cell in nb["cells"]:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "colab-badge" in tags:
            continue
        source = cell_source(cell)
        if cell["cell_type"] == "markdown":
            found = EXERCISE_HEADING.findall(source)
            exercise = found[-1].strip() if found else exercise
            source = chapter_links(source, {Path(p).stem for p in pages})
            source = repository_links(source, ROOT / "solutions", set(pages))
            cell["source"] = MODEL_ANSWER_BLOCK.sub("\n", source) if not solutions else source
        elif cell["cell_type"] == "code":
            if is_exercise_cell(cell):
                if solutions:     # the answer, folded away; the check's output stays in view
                    cell["source"] = "\n".join(line for line in source.split("\n") if not MARKER.match(line))
                    tags.append("hide-input")
                else:             # the student's stub; its output (an error) would only distract
                    cell["source"] = strip_solutions(source, exercise or "Exercise")
                    cell["outputs"] = []
            cell["outputs"] = [out for out in cell.get("outputs", []) if not is_progress_bar(out)]
            if any(is_explorer(out) for out in cell["outputs"]):
                # an explorer: what it drew before any interaction is not the chapter's figure
                cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": WIDGET_NOTE + "\n"}]
        cells.append(cell)
    nb["cells"] = cells
    return nb


def chapter_links(text: str, built: set) -> str:
    """Links to notebooks in chapters/ or solutions/ -> links to the chapter pages; a chapter that is
    not in this build (not written yet, or left out with --chapters) keeps its name, unlinked."""
    return CHAPTER_LINK.sub(lambda m: f"[{m[1]}]({m[2]}.ipynb)" if m[2] in built else m[1], text)


def repository_links(text: str, base: Path, pages: set) -> str:
    """Relative links to files of the repository that are not pages of the book (engramlib/rome.py,
    a benchmark, ...) point at the file on GitHub instead, so that the site has no broken link."""
    def fix(m):
        target = (base / m[1]).resolve()
        if m[1] in pages or not target.exists() or not target.is_relative_to(ROOT):
            return m[0]
        return f"](https://github.com/{GITHUB_REPO}/blob/main/{target.relative_to(ROOT).as_posix()}{m[2] or ''})"
    return RELATIVE_LINK.sub(fix, text)


def front_page(readme: str, chapters: list, has_instructors: bool) -> str:
    """README.md as the book's index: badge images become text links (no external image), links to
    notebooks point at the chapter pages, and hidden tables of contents give the navigation."""
    text = BADGE.sub(r"[open in Colab](\1)", readme)
    text = chapter_links(text, {c.stem for c in chapters})
    text = repository_links(text, ROOT, {c.name for c in chapters} | {"INSTRUCTORS.md"})
    toc = ["", "```{toctree}", ":hidden:", ":caption: Chapters", ""] + [c.stem for c in chapters] + ["```", ""]
    if has_instructors:
        toc += ["```{toctree}", ":hidden:", ":caption: For instructors", "", "INSTRUCTORS", "```", ""]
    return text + "\n".join(toc)


def instructors_page(text: str, chapters: list) -> str:
    text = chapter_links(text, {c.stem for c in chapters})
    text = repository_links(text.replace("](README.md)", "](index.md)"), ROOT,
                            {c.name for c in chapters} | {"index.md"})
    return text


def stage(src: Path, executed: dict, solutions: bool) -> None:
    """Write the Sphinx source folder: index.md, INSTRUCTORS.md, one notebook per chapter."""
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    chapters = [Path(name) for name in sorted(executed)]
    instructors = ROOT / "INSTRUCTORS.md"
    (src / "index.md").write_text(front_page((ROOT / "README.md").read_text(encoding="utf-8"), chapters,
                                             instructors.exists()), encoding="utf-8")
    if instructors.exists():
        (src / "INSTRUCTORS.md").write_text(instructors_page(instructors.read_text(encoding="utf-8"), chapters),
                                            encoding="utf-8")
    for name, path in executed.items():
        nb = page_notebook(json.loads(path.read_text(encoding="utf-8")), solutions, set(executed))
        (src / name).write_text(json.dumps(nb, ensure_ascii=False, indent=1), encoding="utf-8")


def sphinx(src: Path, html: Path, solutions: bool) -> None:
    shutil.rmtree(html, ignore_errors=True)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-c", str(ROOT / "book"), "-W", "--keep-going",
           "-D", f"html_title=In Search of the Engram{'' if solutions else ' (student edition)'}",
           "-d", str(html.parent / (html.name + ".doctrees")), str(src), str(html)]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def build(out: Path, solutions: bool = True, jobs: int = 0, only: str | None = None) -> Path:
    """Build the site; returns the folder of index.html."""
    start = time.time()
    jobs = jobs or os.cpu_count() or 1
    paths = notebooks(only=only)
    print(f"executing {len(paths)} notebooks (FAST sizes, default model), {jobs} at a time")
    executed = execute_all(paths, out / "executed", jobs)
    edition = "solutions" if solutions else "student"
    stage(out / f"src-{edition}", executed, solutions)
    html = out / ("html" if solutions else "html-student")
    sphinx(out / f"src-{edition}", html, solutions)
    print(f"book ({edition}) in {html.relative_to(ROOT) if html.is_relative_to(ROOT) else html}/index.html "
          f"after {time.time() - start:.0f} s")
    return html


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the course as a static HTML book.")
    parser.add_argument("--no-solutions", action="store_true",
                        help="publish the student notebooks: no exercise code, no model answers")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "book")
    parser.add_argument("--jobs", type=int, default=0, help="notebooks executed at once (default: one per core)")
    parser.add_argument("--chapters", default=os.environ.get("CHAPTERS") or None,
                        help='only these chapters, e.g. "01,02" (default: every notebook in solutions/)')
    args = parser.parse_args(argv)
    build(args.out.resolve(), solutions=not args.no_solutions, jobs=args.jobs, only=args.chapters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
