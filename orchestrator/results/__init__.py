"""The results directory of a run (DESIGN §3): metrics.csv, decisions.csv, plan.json, summary.json.

``mtl-orchestrate up`` writes it through ``ResultsWriter`` while rounds come in; ``report`` and anyone
with a spreadsheet read it back. CSV because it is what people open first; rows are appended and the
file closed after every batch so a crash of the orchestrator loses nothing already received.

The summary follows the paper's way of comparing rules: for every normal agent, average the metric over
the final window of rounds (by default the last 20%), then report mean, min and max over the normal
agents. Byzantine agents are excluded: their numbers say nothing about resilience. The computation is
columnar numpy so 100 agents x 500 rounds x 4 rules (200k rows) summarize in well under a second.

No torch here: the orchestrator must render and summarize on a machine without it.

Modules: ``layout`` (files and columns), ``writer``, ``reader``, ``summary``; this package's names
are the API the orchestrator, reports and tests import.
"""

from __future__ import annotations

from orchestrator.results.layout import (
    COUNTS,
    DECISION_COLUMNS,
    DECISIONS_FILE,
    DEFAULT_WINDOW,
    METRIC_COLUMNS,
    METRICS,
    METRICS_FILE,
    PLAN_FILE,
    ROLES,
    SUMMARY_FILE,
    PlanLike,
)
from orchestrator.results.reader import MetricsTable, load_decisions, load_metrics, read_metrics_table
from orchestrator.results.summary import summarize, window_bounds
from orchestrator.results.writer import ResultsWriter, write_summary_file

__all__ = [
    "COUNTS",
    "DECISIONS_FILE",
    "DECISION_COLUMNS",
    "DEFAULT_WINDOW",
    "METRICS",
    "METRICS_FILE",
    "METRIC_COLUMNS",
    "PLAN_FILE",
    "ROLES",
    "SUMMARY_FILE",
    "MetricsTable",
    "PlanLike",
    "ResultsWriter",
    "load_decisions",
    "load_metrics",
    "read_metrics_table",
    "summarize",
    "window_bounds",
    "write_summary_file",
]
