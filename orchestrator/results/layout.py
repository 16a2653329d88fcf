"""The layout of a results directory (DESIGN §3): its files and the columns of its CSV files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.plan import RunPlan

METRIC_COLUMNS: tuple[str, ...] = (
    "round",
    "agent",
    "role",
    "rule",
    "loss",
    "test_loss",
    "test_accuracy",
    "attack_success",
    "accepted",
    "filtered",
    "missing",
    "seconds",
)
DECISION_COLUMNS: tuple[str, ...] = (
    "round",
    "agent",
    "rule",
    "neighbor",
    "decision",
    "weight",
    "ema",
    "loss",
    "reason",
)
# The metrics a task may report; summaries and plots cover those that are not all empty.
METRICS: tuple[str, ...] = ("loss", "test_loss", "test_accuracy", "attack_success")
COUNTS: tuple[str, ...] = ("accepted", "filtered", "missing")
ROLES: tuple[str, ...] = ("normal", "byzantine")
DEFAULT_WINDOW = 0.2

METRICS_FILE = "metrics.csv"
DECISIONS_FILE = "decisions.csv"
PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"

METRIC_REQUIRED = ("round", "agent", "role", "rule")
DECISION_REQUIRED = ("round", "agent", "rule", "neighbor", "decision")
METRIC_INTS = ("round", "accepted", "filtered", "missing")
METRIC_FLOATS = ("loss", "test_loss", "test_accuracy", "attack_success", "seconds")
DECISION_FLOATS = ("weight", "ema", "loss")

PlanLike = RunPlan | Mapping[str, Any]
