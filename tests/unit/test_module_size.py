"""No module over ~400 lines without a reason stated at its top (issue 12 "done means").

A long module is hard to find one's way in; where keeping it whole reads better than a split, its
docstring says so and names its size ("Long (~370 lines) because ...", "A little over 400 lines:
..."), which is what this test looks for. Generated code (mtl_node/proto) is left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mtl_node", "orchestrator", "attacks")
LIMIT = 420  # "~400": a few lines over is not worth a split
REASON = re.compile(r"\b\d{3,} lines\b")
# Modules being split in this round of work, each with who does it; take an entry off once done.
PENDING: dict[str, str] = {}


def long_modules_without_a_reason() -> dict[str, int]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("mtl_node/proto/") or rel in PENDING:
                continue
            text = path.read_text()
            lines = text.count("\n")
            if lines > LIMIT and not REASON.search(ast.get_docstring(ast.parse(text)) or ""):
                found[rel] = lines
    return found


def test_long_modules_say_why_at_the_top() -> None:
    found = long_modules_without_a_reason()
    assert not found, (
        f"over {LIMIT} lines with no reason at the top: {found}; split the module by concern, or say "
        "in its docstring why it stays whole and how long it is ('Long (~N lines) because ...')"
    )


def test_the_check_sees_a_long_module_without_a_reason() -> None:
    """The pattern tells a stated reason from a docstring that gives none."""
    assert REASON.search("Long (~370 lines) because it is one class")
    assert REASON.search("A little over 400 lines: the models stay together")
    assert not REASON.search("The round loop of one agent; 3 lines of setup")
