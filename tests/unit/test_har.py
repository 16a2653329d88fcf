"""Human activity recognition: the UCI HAR loader on a real-format fixture, the offline generator,
the task (per-subject splits, training, scoring), and vectorized scoring against one-by-one."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_node.config import build_config
from mtl_node.core.errors import ConfigError
from mtl_node.data import har_synthetic
from mtl_node.data.uci_har import ACTIVITIES, FEATURES, load_uci_har
from mtl_node.engine import run_agents
from mtl_node.tasks import make_task
from mtl_node.tasks.har import HumanActivityRecognition

FIXTURE = Path(__file__).parent.parent / "fixtures" / "uci_har_small.zip"
# What make_fixtures.py wrote: subject -> activities (0-based), in file order.
EXPECTED = {1: [0, 1, 3, 5], 3: [2, 4, 5, 0], 2: [1, 3, 4, 2]}


@pytest.fixture
def har_dir(tmp_path: Path) -> Path:
    """The fixture unpacked: tmp/UCI HAR Dataset/{train,test}/..."""
    with zipfile.ZipFile(FIXTURE) as z:
        z.extractall(tmp_path)
    return tmp_path / "UCI HAR Dataset"


def _check_fixture_contents(path: Path) -> None:
    data = load_uci_har(path)
    assert data.x.shape == (12, FEATURES) and data.x.dtype == np.float32
    assert data.activities == ACTIVITIES
    assert data.subjects() == [1, 2, 3]
    for subject, activities in EXPECTED.items():
        rows = data.subject == subject
        assert data.y[rows].tolist() == activities
        # feature 0 = subject/10 + activity/100: rows, labels and subjects stay aligned
        np.testing.assert_allclose(data.x[rows, 0], subject / 10 + np.array(activities) / 100, atol=1e-6)
    assert np.all(np.abs(data.x) <= 1.0)


def test_loads_the_unpacked_directory(har_dir: Path) -> None:
    _check_fixture_contents(har_dir)


def test_loads_the_parent_directory_and_the_zip(har_dir: Path) -> None:
    _check_fixture_contents(har_dir.parent)
    _check_fixture_contents(FIXTURE)


def test_loads_the_zip_uci_serves_today(tmp_path: Path) -> None:
    """UCI now serves a zip holding 'UCI HAR Dataset.zip' (plus a readme)."""
    outer = tmp_path / "human+activity+recognition+using+smartphones.zip"
    with zipfile.ZipFile(outer, "w") as z:
        z.write(FIXTURE, "UCI HAR Dataset.zip")
        z.writestr("UCI HAR Dataset.names", "readme")
    _check_fixture_contents(outer)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("short_row", "train/X_train.txt line 2: 560 values, expected 561"),
        ("bad_number", "train/X_train.txt line 1: not a list of numbers"),
        ("label_out_of_range", "train/y_train.txt line 3: activity 9 is not in 1..6"),
        ("missing_subjects", "subject_test.txt"),
        ("row_count", "train: X_train.txt has 8 rows, y_train.txt 7"),
    ],
)
def test_damaged_files_name_the_file_and_line(har_dir: Path, damage: str, message: str) -> None:
    train = har_dir / "train"
    if damage == "short_row":
        lines = (train / "X_train.txt").read_text().splitlines()
        lines[1] = lines[1][:-16]
        (train / "X_train.txt").write_text("\n".join(lines) + "\n")
    elif damage == "bad_number":
        text = (train / "X_train.txt").read_text()
        (train / "X_train.txt").write_text("  x.1" + text[5:])
    elif damage == "label_out_of_range":
        lines = (train / "y_train.txt").read_text().splitlines()
        lines[2] = "9"
        (train / "y_train.txt").write_text("\n".join(lines) + "\n")
    elif damage == "missing_subjects":
        (har_dir / "test" / "subject_test.txt").unlink()
    elif damage == "row_count":
        lines = (train / "y_train.txt").read_text().splitlines()
        (train / "y_train.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ConfigError, match=r"task_params\.data_dir") as err:
        load_uci_har(har_dir)
    assert message in str(err.value)


def test_wrong_paths_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_uci_har(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="neither train/"):
        load_uci_har(tmp_path)
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="neither a directory nor a zip"):
        load_uci_har(tmp_path / "x.zip")


# -- the offline generator ---------------------------------------------------------------------


def test_generator_is_har_shaped_and_seeded() -> None:
    x, y = har_synthetic.generate_subject(0, 5)
    assert x.shape[1] == FEATURES and x.dtype == np.float32
    assert har_synthetic.MIN_SAMPLES <= len(y) <= har_synthetic.MAX_SAMPLES
    assert np.all(np.abs(x) <= 1.0)
    assert set(np.unique(y).tolist()) == set(range(6))
    again = har_synthetic.generate_subject(0, 5)
    np.testing.assert_array_equal(x, again[0])
    other_seed = har_synthetic.generate_subject(1, 5)
    assert not np.array_equal(x[:10], other_seed[0][:10])


def test_generator_subjects_differ_but_share_the_activities() -> None:
    """Subject-specific shifts: per-activity means differ between subjects, yet a subject's activity
    is closer to the same activity of another subject than to a different activity."""
    means = {}
    for s in (1, 2):
        x, y = har_synthetic.generate_subject(0, s, samples=1200)
        means[s] = np.stack([x[y == c].mean(axis=0) for c in range(6)])
    same = np.linalg.norm(means[1] - means[2], axis=1)
    assert np.all(same > 0.05)  # shifted
    for c in range(6):
        others = [np.linalg.norm(means[1][c] - means[2][d]) for d in range(6) if d != c]
        assert same[c] < min(others)


# -- the task ----------------------------------------------------------------------------------


def test_task_splits_one_subject_of_the_real_format(har_dir: Path) -> None:
    task = make_task("har", "a0", 0, {"subject": 3, "data_dir": str(har_dir), "test_fraction": 0.25})
    assert isinstance(task, HumanActivityRecognition)
    assert len(task.train) == 3 and len(task.test) == 1
    together = torch.cat([task.train.x[:, 0], task.test.x[:, 0]]).sort().values
    expected = torch.tensor(sorted(0.3 + a / 100 for a in EXPECTED[3]))
    torch.testing.assert_close(together, expected)


def test_subject_missing_from_the_data_is_named(har_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"task_params.subject: subject 7 has no samples.*subjects there: 1, 2, 3"
    ):
        make_task("har", "a0", 0, {"subject": 7, "data_dir": str(har_dir)})
    with pytest.raises(ConfigError, match=r"task_params\.subject: is required"):
        make_task("har", "a0", 0, {})
    with pytest.raises(ConfigError, match=r"task_params\.subject"):
        make_task("har", "a0", 0, {"subject": 31})


def test_split_is_disjoint_and_keyed_by_subject() -> None:
    a = make_task("har", "a0", 0, {"subject": 4})
    b = make_task("har", "other-agent", 0, {"subject": 4})
    torch.testing.assert_close(a.test.x, b.test.x)
    rows = {tuple(r[:8].tolist()) for r in a.train.x}
    assert not rows & {tuple(r[:8].tolist()) for r in a.test.x}
    assert abs(len(a.test) / (len(a.test) + len(a.train)) - 0.3) < 0.01


def test_vectorized_scoring_equals_one_by_one() -> None:
    fast = make_task("har", "a0", 0, {"subject": 2})
    slow = make_task("har", "a0", 0, {"subject": 2, "vectorized_scoring": False})
    gen = torch.Generator().manual_seed(3)
    models = [
        {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in fast.init_model().items()} for _ in range(7)
    ]
    for r in (1, 2, 40):
        fast.adapt(models[0], r)
        slow.adapt(models[0], r)
        a, b = fast.losses(models, r), slow.losses(models, r)
        np.testing.assert_allclose(a, b, rtol=1e-5)
        assert len(set(a)) == len(a)  # the models really differ


def test_scoring_uses_the_rounds_training_batch() -> None:
    task = make_task("har", "a0", 0, {"subject": 2, "batch_size": 8})
    model = task.init_model()
    task.adapt(model, 5)
    x, y = task.scoring_batch(5)
    manual = torch.nn.functional.cross_entropy(x @ model["weight"].T + model["bias"], y)
    assert task.losses([model, model], 5) == pytest.approx([float(manual)] * 2, rel=1e-5)


def test_batches_walk_epochs_without_repeats() -> None:
    task = make_task("har", "a0", 0, {"subject": 2, "batch_size": 7})
    n = len(task.train)
    seen = torch.cat([task._indices(s) for s in range(n // 7)])
    assert len(set(seen.tolist())) == len(seen)


def _config(agent: str, subject: int, neighbours: list[str], **task_params: object) -> object:
    return build_config(
        {
            "id": agent,
            "task": "har",
            "task_params": {"subject": subject, **task_params},
            "rule": "loss-filtered",
            "rule_params": {"nu": 0.1, "ema_init": 1.0},
            "rounds": 40,
            "neighbors": {n: "inproc:0" for n in neighbours},
        }
    )


def test_agents_learn_in_process() -> None:
    """Three subjects, 40 rounds: every agent's test accuracy climbs well above chance (1/6), and
    metrics carry the test split's loss and accuracy each round."""
    ids = ["a0", "a1", "a2"]
    configs = [_config(a, i + 1, [b for b in ids if b != a], samples=200) for i, a in enumerate(ids)]
    records = run_agents(configs)
    for a in ids:
        rows = records[a].records
        assert len(rows) == 40
        assert all(r.metrics.test_accuracy is not None and r.metrics.test_loss is not None for r in rows)
        assert rows[-1].metrics.test_accuracy > 0.5
        assert rows[-1].metrics.test_loss < rows[0].metrics.test_loss


def test_train_share_skips_rounds_deterministically() -> None:
    task = make_task("har", "a0", 0, {"subject": 2, "train_share": 0.25})
    trained = [task.trains_in(r) for r in range(1, 401)]
    assert 0.15 < sum(trained) / 400 < 0.35
    again = make_task("har", "a0", 0, {"subject": 2, "train_share": 0.25})
    assert trained == [again.trains_in(r) for r in range(1, 401)]
    model = task.init_model()
    skipped = trained.index(False) + 1
    psi = task.adapt(model, skipped)
    assert all(torch.equal(psi[k], model[k]) for k in model)


def test_real_format_directory_copies_work_for_the_engine(har_dir: Path, tmp_path: Path) -> None:
    """Two agents on the real-format data run end to end through the in-process engine."""
    copy = tmp_path / "copy"
    shutil.copytree(har_dir, copy)
    configs = [
        _config("a", 1, ["b"], data_dir=str(copy), batch_size=2, test_fraction=0.25),
        _config("b", 3, ["a"], data_dir=str(copy), batch_size=2, test_fraction=0.25),
    ]
    records = run_agents(configs)
    assert all(len(records[a].records) == 40 for a in ("a", "b"))


def test_resample_scoring_avoids_the_rounds_batch() -> None:
    task = make_task("har", "a0", 0, {"subject": 2, "batch_size": 8, "scoring": "resample"})
    again = make_task("har", "a0", 0, {"subject": 2, "batch_size": 8, "scoring": "resample"})
    model = task.init_model()
    for r in (1, 2, 3):
        task.adapt(model, r)
        trained = {tuple(row[:6].tolist()) for row in task.train.x[task._round_batches(r)[0]]}
        x, y = task.scoring_batch(r)
        assert len(y) == 8
        assert not trained & {tuple(row[:6].tolist()) for row in x}
        torch.testing.assert_close(x, again.scoring_batch(r)[0])
