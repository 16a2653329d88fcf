"""``mtl-orchestrate sweep``: grids of tasks x topologies x rules x attacks x fractions x seeds.

spec (the sweep file and its cells), cell (running one cell, in a worker), executors (local
processes, Ray), store (the per-cell log and the results table), runner, report. Torch-free to
import; torch is loaded only in the workers that run cells.
"""

from orchestrator.sweep.spec import Cell, SweepSpec, load_sweep, parse_sweep

__all__ = ["Cell", "SweepSpec", "load_sweep", "parse_sweep"]
