"""The sweep's heat-maps render whatever the cells hold: diverged cells (inf), cells that grew to
1e298 before the window ended, and cells never run (NaN)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from orchestrator.sweep.report import plot_heatmaps


def test_heatmap_with_astronomical_and_infinite_values(tmp_path: Path) -> None:
    # (fractions, rules, attacks): a 0% panel with only the no-attack column, a 25% panel.
    values = np.full((2, 3, 3), np.nan)
    values[0, :, 0] = [0.03, 27.5, 0.05]
    values[1, :, 1:] = [[0.04, 3.3e298], [math.inf, 1e12], [0.05, 0.06]]
    path = tmp_path / "heat.png"
    plot_heatmaps(
        values, ["a", "b", "c"], ["-", "x", "y"], [0.0, 0.25], "t", "test_loss", path, log_scale=True
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worse_than_alone_ignores_float32_rounding_between_engines() -> None:
    from orchestrator.sweep.store import worse_than_alone

    row = {"metric": "test_accuracy", "alone": 0.912037037037037}
    # The per-agent torch engine's float32 accuracy of the same 197 of 216 samples: not worse.
    assert worse_than_alone({**row, "final": 0.9120370388031006}) is False
    assert worse_than_alone({**row, "final": 0.9120370, "alone": 0.9120370388031006}) is False
    # One test sample fewer right (1/216) is worse; a diverged agent is worse; no reference: None.
    assert worse_than_alone({**row, "final": 196 / 216}) is True
    assert worse_than_alone({**row, "final": None}) is True
    assert worse_than_alone({**row, "final": 0.5, "alone": None}) is None
    loss = {"metric": "test_loss", "alone": 0.0476}
    assert worse_than_alone({**loss, "final": 0.0476 + 1e-9}) is False
    assert worse_than_alone({**loss, "final": 0.0477}) is True
