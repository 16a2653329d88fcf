"""The UCI "Human Activity Recognition Using Smartphones" data set, read from its real file layout.

The layout, as distributed (https://archive.ics.uci.edu/dataset/240)::

    UCI HAR Dataset/
        activity_labels.txt          "1 WALKING" ... "6 LAYING"
        features.txt                 "1 tBodyAcc-mean()-X" ... (561 lines)
        train/X_train.txt            one sample per line, 561 space-separated floats in [-1, 1]
        train/y_train.txt            activity 1..6, one per line
        train/subject_train.txt      subject 1..30, one per line
        test/X_test.txt, test/y_test.txt, test/subject_test.txt   (same, other subjects)

``path`` may be that directory, a directory holding it, the ``UCI HAR Dataset.zip`` archive, or the
archive UCI serves today (a zip holding ``UCI HAR Dataset.zip``), so a user can point at whatever
they downloaded without unpacking it.

The official split puts 21 subjects in train and 9 in test, so a subject's data sits entirely in
one of them. The paper treats every subject as an agent with its own train and test data, so the
loader pools both halves and per-subject splitting is left to the task (mtl_node.tasks.har).
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mtl_node.core.errors import ConfigError

log = logging.getLogger(__name__)

FEATURES = 561
ROOT = "UCI HAR Dataset"
ACTIVITIES = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING")
FIX = "give the 'UCI HAR Dataset' directory or its zip archive, as downloaded from UCI"


@dataclass(frozen=True)
class HarData:
    """All samples of both official halves: x (n, 561) float32, y (n,) in 0..5, subject (n,) >= 1."""

    x: np.ndarray
    y: np.ndarray
    subject: np.ndarray
    activities: tuple[str, ...] = ACTIVITIES

    def subjects(self) -> list[int]:
        return sorted(int(s) for s in np.unique(self.subject))


def load_uci_har(path: str | Path, field: str = "task_params.data_dir") -> HarData:
    """Read the data set at ``path`` (cached per process: 30 agents in one process parse it once)."""
    return _load(str(Path(path).expanduser().resolve()), field)


@lru_cache(maxsize=2)
def _load(path: str, field: str) -> HarData:
    read = _reader(Path(path), field)
    labels = _activity_labels(read, field)
    xs, ys, ss = [], [], []
    for half in ("train", "test"):
        x = _floats(read, f"{half}/X_{half}.txt", field)
        y = _ints(read, f"{half}/y_{half}.txt", field)
        s = _ints(read, f"{half}/subject_{half}.txt", field)
        if not len(x) == len(y) == len(s):
            raise ConfigError(
                field,
                f"{half}: X_{half}.txt has {len(x)} rows, y_{half}.txt {len(y)}, subject_{half}.txt {len(s)}",
                "the three files of a half must have one line per sample",
            )
        bad = (y < 1) | (y > len(labels))
        if np.any(bad):
            line = int(np.flatnonzero(bad)[0]) + 1
            raise ConfigError(
                field, f"{half}/y_{half}.txt line {line}: activity {y[line - 1]} is not in 1..{len(labels)}"
            )
        if np.any(s < 1):
            line = int(np.flatnonzero(s < 1)[0]) + 1
            raise ConfigError(field, f"{half}/subject_{half}.txt line {line}: subject {s[line - 1]} < 1")
        xs.append(x)
        ys.append(y - 1)
        ss.append(s)
    data = HarData(
        x=np.concatenate(xs).astype(np.float32),
        y=np.concatenate(ys).astype(np.int64),
        subject=np.concatenate(ss).astype(np.int64),
        activities=labels,
    )
    log.info("UCI HAR: %d samples, %d subjects from %s", len(data.y), len(data.subjects()), path)
    return data


Reader = Callable[[str], bytes]


def _reader(path: Path, field: str) -> Reader:
    """A function reading ``relative path inside 'UCI HAR Dataset'`` -> bytes, for dirs and zips."""
    if path.is_dir():
        root = path if (path / "train").is_dir() else path / ROOT
        if not (root / "train").is_dir():
            raise ConfigError(field, f"{path} holds neither train/ nor '{ROOT}/train/'", FIX)

        def read_file(rel: str) -> bytes:
            try:
                return (root / rel).read_bytes()
            except OSError as exc:
                raise ConfigError(field, f"cannot read {root / rel}: {exc.strerror}", FIX) from None

        return read_file
    if path.is_file():
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ConfigError(
                field, f"{path} is neither a directory nor a zip archive ({exc})", FIX
            ) from None
        return _zip_reader(archive, str(path), field)
    raise ConfigError(field, f"{path} does not exist", FIX)


def _zip_reader(archive: zipfile.ZipFile, name: str, field: str, depth: int = 0) -> Reader:
    names = [n for n in archive.namelist() if not n.startswith("__MACOSX")]
    prefix = next((n[: -len("train/X_train.txt")] for n in names if n.endswith("train/X_train.txt")), None)
    if prefix is None:
        inner = next((n for n in names if n.endswith(f"{ROOT}.zip")), None)
        if inner is not None and depth == 0:
            nested = zipfile.ZipFile(io.BytesIO(archive.read(inner)))
            return _zip_reader(nested, f"{name}!{inner}", field, depth + 1)
        raise ConfigError(field, f"{name} holds no train/X_train.txt", FIX)

    def read_member(rel: str) -> bytes:
        try:
            return archive.read(prefix + rel)
        except KeyError:
            raise ConfigError(field, f"{name} lacks {prefix + rel}", FIX) from None

    return read_member


def _activity_labels(read: Reader, field: str) -> tuple[str, ...]:
    try:
        text = read("activity_labels.txt").decode()
    except ConfigError:
        log.debug("no activity_labels.txt: using the standard six")
        return ACTIVITIES
    labels: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[0] != str(len(labels) + 1):
            raise ConfigError(field, f"activity_labels.txt line {number}: expected 'N NAME', got {line!r}")
        labels.append(parts[1])
    return tuple(labels)


def _floats(read: Reader, rel: str, field: str) -> np.ndarray:
    lines = [ln for ln in read(rel).decode(errors="replace").split("\n") if ln.strip()]
    try:
        values = np.array(" ".join(lines).split(), dtype=np.float64)
    except ValueError:
        values = np.empty(0)
    if len(values) != len(lines) * FEATURES:
        # Find the offending line only on the slow path.
        for number, line in enumerate(lines, 1):
            parts = line.split()
            try:
                [float(v) for v in parts]
            except ValueError:
                raise ConfigError(field, f"{rel} line {number}: not a list of numbers") from None
            if len(parts) != FEATURES:
                raise ConfigError(field, f"{rel} line {number}: {len(parts)} values, expected {FEATURES}")
    return values.reshape(len(lines), FEATURES)


def _ints(read: Reader, rel: str, field: str) -> np.ndarray:
    out = []
    for number, line in enumerate(read(rel).decode(errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append(int(line.strip()))
        except ValueError:
            raise ConfigError(field, f"{rel} line {number}: {line.strip()!r} is not an integer") from None
    return np.array(out, dtype=np.int64)
