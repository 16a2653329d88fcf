"""Digit classification: the MNIST IDX loader on real-format fixtures, the offline stand-ins
(bundled digits, font-rendered synthetic digits), the paper's CNN, a tiny CNN run, and vectorized
scoring against one-by-one."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_node.config import build_config
from mtl_node.core.errors import ConfigError
from mtl_node.data.idx import load_mnist, parse_idx, read_idx
from mtl_node.data.sklearn_digits import bundled_digits
from mtl_node.data.synthetic_digits import font_count, render_digits
from mtl_node.engine import run_agents
from mtl_node.tasks import make_task
from mtl_node.tasks.digits import DigitClassification, PaperCNN

FIXTURE = Path(__file__).parent.parent / "fixtures" / "mnist_small"


def test_idx_fixture_reads_as_mnist() -> None:
    m = load_mnist(FIXTURE)
    assert m.train_x.shape == (20, 28, 28) and m.test_x.shape == (10, 28, 28)
    assert m.train_x.dtype == np.float32 and m.train_x.min() >= 0.0 and m.train_x.max() <= 1.0
    assert m.train_x.max() > 0.9  # uint8 255 scaled to 1
    images, labels = bundled_digits()
    np.testing.assert_array_equal(m.train_y, labels[:20])
    np.testing.assert_array_equal(m.test_y, labels[20:30])
    np.testing.assert_allclose(m.train_x, np.round(images[:20] * 255) / 255, atol=1e-6)


def test_plain_dotted_and_torchvision_layouts(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FIXTURE.iterdir():
        stem = f.name.removesuffix(".gz").replace("-idx", ".idx")  # train-images.idx3-ubyte
        (raw / stem).write_bytes(gzip.decompress(f.read_bytes()))
    m = load_mnist(tmp_path)
    np.testing.assert_array_equal(m.test_y, load_mnist(FIXTURE).test_y)


def test_idx_header_is_checked(tmp_path: Path) -> None:
    good = gzip.decompress((FIXTURE / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert parse_idx(good, "x").shape == (10,)
    with pytest.raises(ConfigError, match="not an IDX file"):
        parse_idx(b"\x1f\x00\x08\x01" + good[4:], "x")
    with pytest.raises(ConfigError, match="bytes, but the header"):
        parse_idx(good[:-1], "x")
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ConfigError, match="damaged gzip"):
        read_idx(bad)
    # big-endian int32 values
    header = bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big")
    values = b"".join(v.to_bytes(4, "big", signed=True) for v in (1, -2, 70000))
    assert parse_idx(header + values, "x").tolist() == [1, -2, 70000]


def test_missing_mnist_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task_params.mnist_dir: no train-images-idx3-ubyte\[.gz\]"):
        load_mnist(tmp_path)
    shutil.copytree(FIXTURE, tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="t10k-labels"):
        load_mnist(tmp_path / "m")


def test_bundled_digits_are_mnist_shaped() -> None:
    images, labels = bundled_digits()
    assert images.shape == (1797, 28, 28) and labels.shape == (1797,)
    assert set(labels.tolist()) == set(range(10))
    assert images[:, :4].max() == 0 and images[:, -4:].max() == 0  # 20x20 box, 4-pixel border
    assert images.max() == pytest.approx(1.0)


def test_synthetic_digits_are_seeded_and_varied() -> None:
    labels = np.arange(40) % 10
    a = render_digits(labels, np.random.default_rng(5))
    b = render_digits(labels, np.random.default_rng(5))
    c = render_digits(labels, np.random.default_rng(6))
    assert a.shape == (40, 28, 28) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert font_count() >= 5
    # Backgrounds vary: mean intensity spreads over the range; every image has visible structure.
    assert a.mean(axis=(1, 2)).std() > 0.1
    assert np.all(a.std(axis=(1, 2)) > 0.02)


def test_cnn_matches_the_paper() -> None:
    net = PaperCNN()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["conv1.weight"] == (32, 1, 3, 3)
    assert shapes["conv2.weight"] == (64, 32, 3, 3)
    assert shapes["conv3.weight"] == (64, 64, 3, 3)
    assert shapes["fc1.weight"] == (128, 576)
    assert shapes["fc2.weight"] == (10, 128)
    assert net(torch.zeros(5, 28, 28)).shape == (5, 10)


def test_groups_draw_from_disjoint_pools() -> None:
    a = make_task("digits", "a0", 0, {"train_samples": 300, "test_samples": 100})
    b = make_task("digits", "a1", 0, {"train_samples": 300, "test_samples": 100})
    assert isinstance(a, DigitClassification)
    flat = {tuple(x.flatten()[::7].tolist()) for t in (a, b) for x in t.train.x}
    tests = {tuple(x.flatten()[::7].tolist()) for t in (a, b) for x in t.test.x}
    assert not flat & tests  # no agent is tested on an image any agent trained on
    assert not torch.equal(a.train.x, b.train.x)
    s = make_task("digits", "a5", 0, {"dataset": "synthetic", "train_samples": 30, "test_samples": 10})
    assert s.train.x.shape == (30, 28, 28) and s.test.x.shape == (10, 28, 28)


def test_too_many_samples_name_the_parameter() -> None:
    with pytest.raises(ConfigError, match=r"task_params.train_samples: 5000 asked"):
        make_task("digits", "a0", 0, {"train_samples": 5000})
    with pytest.raises(ConfigError, match=r"task_params\.test_samples"):
        make_task("digits", "a0", 0, {"test_samples": 11, "mnist_dir": str(FIXTURE), "train_samples": 5})


def test_vectorized_scoring_equals_one_by_one() -> None:
    params = {"train_samples": 64, "test_samples": 10, "batch_size": 16, "init": "agent"}
    fast = make_task("digits", "a0", 0, params)
    slow = make_task("digits", "a0", 0, {**params, "vectorized_scoring": False})
    models = [make_task("digits", f"n{i}", 0, params).init_model() for i in range(5)]
    for r in (1, 2):
        fast.adapt(models[0], r)
        slow.adapt(models[0], r)
        a, b = fast.losses(models, r), slow.losses(models, r)
        np.testing.assert_allclose(a, b, rtol=1e-4)
        assert len(set(a)) == len(a)


def test_tiny_cnn_run_learns_and_scores_groups() -> None:
    """Four agents (two per data source) for a few rounds on the MNIST fixture and synthetic digits:
    the run completes with test metrics every other round, every neighbour is scored each round,
    and each agent's final model fits its training data better than its initial one."""
    ids = ["g1a", "g1b", "g2a", "g2b"]
    common = {"batch_size": 10, "lr": 0.003, "test_samples": 10, "eval_every": 2}
    task_params = {
        "g1a": {"dataset": "mnist", "mnist_dir": str(FIXTURE), "train_samples": 20},
        "g1b": {"dataset": "mnist", "mnist_dir": str(FIXTURE), "train_samples": 20},
        "g2a": {"dataset": "synthetic", "train_samples": 20},
        "g2b": {"dataset": "synthetic", "train_samples": 20},
    }
    configs = [
        build_config(
            {
                "id": a,
                "task": "digits",
                "task_params": {**common, **task_params[a]},
                "rule": "loss-filtered",
                "rule_params": {"nu": 0.3, "ema_init": 1.0},
                "rounds": 10,
                "neighbors": {n: "inproc:0" for n in ids if n != a},
            }
        )
        for a in ids
    ]
    records = run_agents(configs, keep_models=True)
    for a in ids:
        rows = records[a].records
        assert [r.metrics.test_accuracy is not None for r in rows] == [r % 2 == 0 for r in range(1, 11)]
        assert all(r.accepted + r.filtered == 3 for r in rows)
        task = make_task("digits", a, 0, {**common, **task_params[a]})
        before, after = task.losses_one_by_one(
            [task.init_model(), records[a].models[-1]], task.train.x, task.train.y
        ).tolist()
        assert after < before
