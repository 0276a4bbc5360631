"""Sphinx configuration for carrot_kombu."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import carrot_kombu  # noqa: E402

project = "carrot_kombu"
author = "carrot_kombu developers"
release = version = carrot_kombu.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.intersphinx"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
intersphinx_mapping: dict[str, tuple[str, None]] = {}
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
