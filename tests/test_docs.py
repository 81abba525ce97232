"""The documentation's Python examples run: every ```python block of the user guide (docs/guide/*.md) and of
docs/getting-started.md, the blocks of one page in order in one namespace, in a temporary folder.

A block right after an ``<!-- skip -->`` comment is not run; only examples that need what a test machine lacks
(``torchrun``, CUDA) may be skipped, and their page says so. The quickstart of docs/getting-started.md (the
README's) runs with 20 SVI steps instead of 2000 and 2 epochs instead of 50. Docs code uses public names only.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted((DOCS / "guide").glob("*.md")) + [DOCS / "getting-started.md"]
# Shorter runs of the same code, page by page.
SHORTER = {"getting-started.md": [("range(2000)", "range(20)"), ("epochs=50", "epochs=2")]}
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip\s*-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, skipped)`` for each ```python block of ``path``; ``line`` is the first line of code."""
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n")
        skipped = bool(SKIP.search(before.rsplit("\n", 1)[-1]))
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1), skipped))
    return blocks


def test_the_pages_have_examples():
    assert len(PAGES) >= 10
    assert sum(len(python_blocks(p)) for p in PAGES) >= 25


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_examples_of_a_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code, skipped in python_blocks(page):
        if skipped:
            continue
        for old, new in SHORTER.get(page.name, []):
            code = code.replace(old, new)
        # Blank lines in front, so that a traceback names the line of the page.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


def test_only_torchrun_and_cuda_examples_are_skipped():
    for page in PAGES:
        for line, code, skipped in python_blocks(page):
            if skipped:
                assert re.search(r"cuda|torchrun", code, re.I), f"{page.name}:{line} is skipped"


def test_docs_code_uses_public_names_only():
    for page in [*DOCS.rglob("*.md"), ROOT / "README.md"]:
        for line, code, _ in python_blocks(page):
            private = re.findall(r"\.\s*_[A-Za-z]\w*", code)
            assert not private, f"{page.relative_to(ROOT)}:{line}: {private}"


def test_the_readme_quickstart_is_the_one_the_docs_run():
    readme = python_blocks(ROOT / "README.md")[0][1]
    assert readme == python_blocks(DOCS / "getting-started.md")[0][1]


# Old module paths kept for one release: they re-export their new homes and have no page of their own.
SHIMS = {"vae", "conditional", "linear_gaussian", "relaxed", "kl", "estimators", "variance", "step", "distributed"}


def _package_files() -> list[Path]:
    """The package's committed modules (``git ls-files``; every file on disk outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "pyro_vae"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return list((ROOT / "pyro_vae").rglob("*.py"))
    return [ROOT / line for line in out.stdout.splitlines() if line.endswith(".py") and (ROOT / line).is_file()]


def test_every_module_has_a_place_in_the_api_reference():
    modules = set()
    for path in _package_files():
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if parts[-1] != "__main__" and not (len(parts) == 2 and parts[1] in SHIMS):
            modules.add(name)
    documented = set(re.findall(r"^::: ([\w.]+)", "".join(p.read_text() for p in (DOCS / "api").glob("*.md")), re.M))
    assert sorted(modules - documented) == [], "modules without an API page"
    assert sorted(documented - modules) == [], "API pages of modules that do not exist"
