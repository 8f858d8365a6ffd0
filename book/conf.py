"""Sphinx configuration of the course book (tools/build_book.py stages the sources and runs Sphinx
with `-c book`). MyST-NB renders the executed notebooks; nothing is executed here."""
import shutil
from pathlib import Path

import jupyter_server_mathjax

project = "In Search of the Engram"
author = "the In Search of the Engram authors"
copyright = "the In Search of the Engram authors, MIT licence"

extensions = ["myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "*.run"]
master_doc = "index"

# the notebooks arrive executed (tools/build_book.py); MyST-NB only renders them
nb_execution_mode = "off"
nb_ipywidgets_js = {}                    # no widget JavaScript from a CDN (widget outputs are replaced)
nb_code_prompt_show = "Show the solution"
nb_code_prompt_hide = "Hide the solution"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "html_image"]
myst_heading_anchors = 3
myst_update_mathjax = False
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]

# Math: MathJax 2.7 served from the site itself (the copy that the jupyter-server-mathjax package
# ships on PyPI), so the book renders its equations offline; no CDN.
MATHJAX = Path(jupyter_server_mathjax.__file__).parent / "static"
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
mathjax2_config = {"tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]],
                               "processRefs": False, "processEnvironments": False},
                   # the package ships MathJax's STIX web fonts (woff) only: use them, never local fonts
                   "HTML-CSS": {"availableFonts": [], "webFont": "STIX-Web", "imageFont": None},
                   "messageStyle": "none"}

html_theme = "sphinx_book_theme"
html_title = project
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": True,
    "navigation_with_keys": False,
}
html_last_updated_fmt = None
html_copy_source = False


def _copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html":
        target = Path(app.outdir) / "_static" / "mathjax"
        if not (target / "MathJax.js").exists():
            shutil.copytree(MATHJAX, target, dirs_exist_ok=True)


def setup(app):
    app.connect("build-finished", _copy_mathjax)
