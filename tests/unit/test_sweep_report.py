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
