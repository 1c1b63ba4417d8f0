"""The README for a newcomer: short, and its Layout section names what the tree holds (and nothing it does not)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def layout_paths() -> list[str]:
    """The paths the README's Layout section lists, one per entry (continuation lines carry none)."""
    block = README.split("## Layout", 1)[1]
    return [m.group(1) for m in re.finditer(r"^    (\S+)\s{2,}\S", block, re.M)]


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 150


def test_every_path_the_layout_lists_exists():
    listed = layout_paths()
    assert len(listed) >= 15
    missing = [p for p in listed if not (REPO / p).exists()]
    assert not missing, missing


def test_the_layout_lists_every_package_and_module_of_the_library():
    listed = {p.rstrip("/") for p in layout_paths()}
    entries = [p for p in (REPO / "lungviz").iterdir()
               if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and not p.name.startswith("_"))]
    unlisted = [p.relative_to(REPO).as_posix() for p in entries if p.relative_to(REPO).as_posix() not in listed]
    assert not unlisted, unlisted
    for top in ("training", "weights", "docs", "tests", "app_pages", "streamlit_app.py"):
        assert top in listed
