"""Sphinx configuration: the API reference (docs/api/) built from fmjax's docstrings, with
the Markdown guides beside it.

    pip install -e ".[docs]" && sphinx-build -W --keep-going -b html docs docs/_build/html

``tests/test_docs_api.py`` runs the same build (warnings are errors) and checks that every
public name of every fmjax module is in it.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "fmjax"
author = "the fmjax authors"
copyright = "2026, the fmjax authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the Google-style "Args:" / "Returns:" sections
    "sphinx.ext.mathjax",
    "myst_parser",  # the guides are Markdown
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "notebooks", "benchmarks_*.json"]

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_preserve_defaults = True  # show `solver="dopri5"`, not an evaluated object
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "fmjax"
