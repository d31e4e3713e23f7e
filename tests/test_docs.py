"""The README and docs/ against the repository: every command they name is installed and answers
``--help``, every repository path they name exists, every link between pages resolves, no
user-facing step is spelled ``python -m``, and the README stays short.

Fails if a command, config, script or page is renamed or removed without the docs following, or
if a link's target heading changes (each check below was broken on purpose: a renamed config in
a page, a link to a missing heading, a ``vlbert-`` command that setup.py lacks)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A repository path as the docs write it: a known top-level folder, then a file or folder name.
PATH = re.compile(r"(?<![\w./-])((?:configs|ds_configs|scripts|slurm|tools|bench|tests|docs|vlbert)/[\w./-]*\w)")
# A command name; an MLflow experiment named after the project (``--experiment vlbert-demo``) is not one.
COMMAND = re.compile(r"(?<![\w/.-])(?<!--experiment )(vlbert-[a-z][a-z-]*[a-z])\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def console_scripts() -> set[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            return {e.split("=", 1)[0].strip() for e in ast.literal_eval(node.value)["console_scripts"]}
    raise AssertionError("setup.py has no entry_points")


def slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's rule) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def test_slug_rule():
    assert slug("The demo comparison") == "the-demo-comparison"
    assert slug("VQA v2") == "vqa-v2"
    assert slug("Tracking and comparing runs") == "tracking-and-comparing-runs"


def test_there_are_pages():
    names = {p.name for p in PAGES}
    for page in ("README.md", "install.md", "data.md", "detector.md", "pretraining.md", "tracking.md",
                 "finetuning.md", "demo.md", "performance.md", "development.md", "design.md"):
        assert page in names, page


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, len(lines)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_command_is_installed(page):
    installed = console_scripts()
    named = set(COMMAND.findall(page.read_text()))
    assert named - installed == set(), f"{page.name} names commands that setup.py does not install"


def test_every_installed_command_is_documented():
    """The commands' --help (with its example) runs in tests/test_entry_points.py; here: each one
    appears in some page, so a user can find it."""
    text = "\n".join(p.read_text() for p in PAGES)
    assert console_scripts() - set(COMMAND.findall(text)) == set()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_path_exists(page):
    missing = []
    for path in PATH.findall(page.read_text()):
        if any(ch in path for ch in "*{<"):
            continue  # a pattern (shards of a store), not a file of this repository
        if not (REPO / path).exists():
            missing.append(path)
    assert missing == [], f"{page.name} names paths that do not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue  # external: not checked (no network in the tests)
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == [], f"{page.name} has broken links"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_python_m_for_user_steps(page):
    """User-facing steps are installed commands; ``python bench/...`` and ``python scripts/...``
    (files run by path) are fine."""
    assert re.findall(r"python3? -m vlbert\.\S+", page.read_text()) == []
