"""Report rendering from a synthetic results directory: real PNGs read back, markdown content, errors."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from mtl_node.core.errors import ConfigError
from orchestrator.report import band_by_round, layout, write_report
from orchestrator.results import ResultsWriter, read_metrics_table, window_bounds

sys.path.insert(0, str(Path(__file__).parent))
from test_results import AGENTS, BYZANTINE, RULES, expected_stats, make_plan, metric_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_results(directory: Path, *, positions: bool = True, accuracy: bool = True) -> Path:
    plan = make_plan()
    if not positions:
        plan = replace(plan, agents=tuple(replace(a, position=None) for a in plan.agents))
    rows = metric_rows()
    if not accuracy:
        for r in rows:
            r["test_accuracy"] = None
    writer = ResultsWriter(directory=directory, plan=plan)
    writer.add_metrics(rows)
    writer.write_summary("sim", 4.25)
    return directory


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    image = mpimg.imread(path)
    height, width = image.shape[:2]
    assert 300 <= width <= 4000 and 300 <= height <= 4000, (path, image.shape)
    # Not a blank canvas: a figure has drawn pixels of more than one colour.
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 10, path


def test_report_writes_figures_and_markdown(tmp_path: Path) -> None:
    out = make_results(tmp_path / "run")
    written = write_report(out)
    names = sorted(p.name for p in written)
    want = [
        "loss.png",
        "test_loss.png",
        "test_accuracy.png",
        "attack_success.png",
        "network.png",
        "report.md",
    ]
    assert names == sorted(want)
    for path in written:
        assert path.parent == out and path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert_png(path)

    md = (out / "report.md").read_text()
    assert "synthetic-ring" in md and "sim" in md and "| seed | 7 |" in md
    first, last = window_bounds(20, 0.2)
    assert f"{first}-{last}" in md
    assert "4.2 s" in md or "4.3 s" in md  # wall time from summary.json
    for name in ("loss.png", "test_loss.png", "test_accuracy.png", "attack_success.png", "network.png"):
        assert f"]({name})" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and "|---" not in line]
    for rule in RULES:
        rule_rows = [line for line in table_rows if line.startswith(f"| {rule} |")]
        # One row per metric table plus one in the decisions table.
        assert len(rule_rows) == 5, (rule, rule_rows)
    # The loss table carries the independently computed mean of the first rule.
    want = expected_stats("loss", 0, first, last)
    assert want is not None
    assert f"| {RULES[0]} | {len(AGENTS) - len(BYZANTINE)} | {first}-{last} | {want['mean']:.4g} |" in md
    # Rule 'none' has no accuracy: a dash, not a number.
    acc_section = md.split("(`test_accuracy`)")[1].split("###")[0]
    assert "| none | 4 | 17-20 | — | — | — |" in acc_section


def test_report_omits_absent_metric_and_draws_circle_without_positions(tmp_path: Path) -> None:
    out = make_results(tmp_path / "run", positions=False, accuracy=False)
    names = {p.name for p in write_report(out)}
    assert "test_accuracy.png" not in names and not (out / "test_accuracy.png").exists()
    assert {"loss.png", "test_loss.png", "network.png", "report.md"} <= names
    assert_png(out / "network.png")
    assert "test_accuracy" not in (out / "report.md").read_text()
    coords = layout(json.loads((out / "plan.json").read_text()))
    radii = [np.hypot(x, y) for x, y in coords.values()]
    assert np.allclose(radii, 1.0) and len(coords) == len(AGENTS)


def test_report_without_summary_json_still_renders(tmp_path: Path) -> None:
    out = make_results(tmp_path / "run")
    (out / "summary.json").unlink()
    write_report(out)
    assert "| backend | — |" in (out / "report.md").read_text()


def test_band_is_over_normal_agents_only(tmp_path: Path) -> None:
    out = make_results(tmp_path / "run")
    table = read_metrics_table(out / "metrics.csv")
    rounds, mean, lo, hi = band_by_round(table, "loss", "average")
    assert rounds.tolist() == list(range(1, 21))
    normal = [rows for rows in metric_rows() if rows["rule"] == "average" and rows["role"] == "normal"]
    for k, rnd in enumerate(rounds):
        vals = [r["loss"] for r in normal if r["round"] == rnd]
        assert mean[k] == pytest.approx(sum(vals) / len(vals))
        assert (lo[k], hi[k]) == (min(vals), max(vals))  # Byzantine 1e6 never reaches the band


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere"):
        write_report(tmp_path / "nowhere")
    out = make_results(tmp_path / "run")
    (out / "plan.json").rename(out / "plan.bak")
    with pytest.raises(ConfigError, match=r"plan\.json.*not found"):
        write_report(out)
    (out / "plan.bak").rename(out / "plan.json")
    (out / "metrics.csv").unlink()
    with pytest.raises(ConfigError, match=r"metrics\.csv.*not found"):
        write_report(out)


@pytest.mark.parametrize(
    ("file", "content", "match"),
    [
        ("plan.json", "{not json", r"plan\.json.*JSON"),
        ("plan.json", "[1, 2]", r"plan\.json.*object"),
        ("plan.json", '{"rounds": 0, "agents": []}', r"plan\.json: rounds"),
        ("plan.json", '{"rounds": 5, "agents": [{"role": "normal"}]}', r"plan\.json: agents"),
        ("plan.json", '{"rounds": 5, "window": 2, "agents": []}', r"plan\.json: window"),
        ("metrics.csv", "", r"metrics\.csv.*empty"),
        ("metrics.csv", "round,agent,role,rule\n", r"metrics\.csv.*no rows"),
        ("metrics.csv", "round,agent\n1,a0\n", r"metrics\.csv.*lacks"),
        ("summary.json", "{", r"summary\.json.*JSON"),
    ],
)
def test_malformed_files_name_the_file(tmp_path: Path, file: str, content: str, match: str) -> None:
    out = make_results(tmp_path / "run")
    (out / file).write_text(content)
    with pytest.raises(ConfigError, match=match):
        write_report(out)
