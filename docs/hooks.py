"""MkDocs hooks for this site.

- The figures stay where the benchmark scripts commit them, in ``benchmarks/results/``: every file there is
  served at ``benchmarks/results/NAME`` of the site, and a page links to it by its path in the repository
  (``../benchmarks/results/NAME`` from ``docs/results.md``), so the same link works on GitHub and in the site.
- Docstrings cross-reference in Sphinx roles (``:func:`fit```); the API pages show the name as code.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def on_files(files, config):
    for path in sorted((ROOT / RESULTS).iterdir()):
        if path.is_file():
            files.append(File.generated(config, f"{RESULTS}/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # a page's links to the repository climb one folder more than the site's
    return markdown.replace(f"]({'../' * (depth + 1)}{RESULTS}/", f"]({'../' * depth}{RESULTS}/")


def on_page_content(html, page, config, files):
    return ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)
