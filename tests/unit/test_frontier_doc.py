"""benchmarks/frontier.py: the frontier block of docs/robustness.md is replaced in place (the rest
of the page untouched) and kept by benchmarks/robustness.py's re-render; the defeat test compares
errors (loss, or 1 - accuracy) with learning alone."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.frontier import BEGIN, END, _defeated, kept_block, splice  # noqa: E402


def test_splice_replaces_only_the_block() -> None:
    doc = f"# Title\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter\n"
    new = f"{BEGIN}\nnew table\n{END}\n"
    out = splice(doc, new)
    assert out == f"# Title\n\nbefore\n\n{BEGIN}\nnew table\n{END}\n\nafter\n"
    assert kept_block(out) == new


def test_splice_appends_when_the_page_has_no_block() -> None:
    new = f"{BEGIN}\nt\n{END}\n"
    out = splice("# Title\n\ntext\n", new)
    assert out == f"# Title\n\ntext\n\n{new}"
    assert kept_block("# Title\n") == ""


def test_defeat_is_ten_percent_more_error_than_alone() -> None:
    # Loss: 0.11 vs 0.10 alone is exactly 10% more (not defeated); 0.111 is.
    assert not _defeated(0.10 * 1.1, 0.10, "test_loss")
    assert _defeated(0.111, 0.10, "test_loss")
    assert not _defeated(0.05, 0.10, "test_loss")
    # Accuracy: error 1 - 0.78 = 0.22 vs 0.20 alone is 10%: not defeated; 0.77 (error 0.23) is.
    assert not _defeated(0.781, 0.80, "test_accuracy")
    assert _defeated(0.77, 0.80, "test_accuracy")
    assert not _defeated(0.95, 0.80, "test_accuracy")
    # A diverged cell is defeated; a missing one is not judged.
    assert _defeated(math.inf, 0.10, "test_loss")
    assert not _defeated(math.nan, 0.10, "test_loss")
    assert not _defeated(0.2, math.nan, "test_loss")
