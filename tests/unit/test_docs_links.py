"""The README and docs/ point only at files that exist, and docs/layout.py measures what it says it measures."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000  # bytes: the README is read in minutes; the rest lives in docs/
QUICK_START = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[train]" && cliptuner demo\n',
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && python -m pytest\n',
)

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
# a code span that names a file of this repository: a path under one of its top-level folders, or a top-level file
REPO_PATH = re.compile(
    r"^(?:(?:cliptuner|executors|flows|tests|benchmarks|docs|deploy|\.ci)/[\w./-]*|Dockerfile|config\.yml|pyproject\.toml)$"
)


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (a link or a path in a shell example is not checked)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in _prose(page).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page)) if not re.match(r"^[a-z]+:", t)]


def _paths(page: Path) -> list[str]:
    return [s.split("::")[0] for s in CODE.findall(_prose(page)) if REPO_PATH.match(s.split("::")[0])]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_repository_path_named_in_code_exists(page):
    missing = [p for p in _paths(page) if not (ROOT / p).exists()]
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def test_the_link_check_finds_a_broken_link_and_a_missing_path(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](nowhere.md) `cliptuner/nowhere.py` `models/CURRENT`\n```\n[x](y.md)\n```\n")
    assert _links(page) == ["page.md", "nowhere.md"]
    assert _paths(page) == ["cliptuner/nowhere.py"]


def test_readme_is_short_and_keeps_the_two_quick_start_commands():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= README_LIMIT, f"README.md is {len(readme)} bytes; move detail into docs/"
    for command in QUICK_START:
        assert command in readme.decode("utf-8")


def _layout():
    spec = importlib.util.spec_from_file_location("layout", ROOT / "docs" / "layout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_layout_follows_absolute_relative_and_lazy_imports(tmp_path):
    _write(
        tmp_path,
        {
            "cliptuner/__init__.py": "",
            "cliptuner/low.py": "import os\n",
            "cliptuner/mid/__init__.py": "",
            "cliptuner/mid/a.py": "from .. import low\n",
            "cliptuner/mid/b.py": "def f():\n    from cliptuner.mid.a import thing\n    return thing\n",
            "cliptuner/top.py": "import cliptuner.mid.b\n\n\ndef g():\n    x = 1\n    return x\n",
            "executors/__init__.py": "from cliptuner import top\n",
        },
    )
    figures = _layout().figures(tmp_path)
    assert figures["modules"] == 7
    assert figures["modules_per_folder"] == {"cliptuner": 3, "cliptuner/mid": 3, "executors": 1}
    assert figures["deepest_chain"] == [
        "executors",
        "cliptuner.top",
        "cliptuner.mid.b",
        "cliptuner.mid.a",
        "cliptuner.low",
    ]
    assert figures["cycles"] == []
    assert figures["largest_module"] == {"path": "cliptuner/top.py", "lines": 6}
    assert figures["largest_function"]["lines"] == 3


def test_layout_reports_a_cycle_and_counts_it_as_one_step(tmp_path):
    _write(
        tmp_path,
        {
            "cliptuner/__init__.py": "",
            "cliptuner/a.py": "from cliptuner import b\n",
            "cliptuner/b.py": "def f():\n    import cliptuner.a\n",
            "cliptuner/c.py": "import cliptuner.a\n",
        },
    )
    figures = _layout().figures(tmp_path)
    assert figures["cycles"] == [["cliptuner.a", "cliptuner.b"]]
    assert figures["deepest_chain"] == ["cliptuner.c", "{cliptuner.a, cliptuner.b}"]
