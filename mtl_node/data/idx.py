"""MNIST from its real files: the IDX format (http://yann.lecun.com/exdb/mnist/), plain or gzipped.

IDX: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), the number of dimensions, each dimension as a big-endian uint32,
then the values, big-endian, row-major.

``load_mnist`` finds the four files under the names they are distributed with
(``train-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``, ...), also the dotted variant some
mirrors use (``train-images.idx3-ubyte``) and torchvision's ``MNIST/raw/`` folder, so a copy from
anywhere works without renaming.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mtl_node.core.errors import ConfigError

log = logging.getLogger(__name__)

_TYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FIX = "give the directory holding MNIST's IDX files (train-images-idx3-ubyte[.gz], ...)"


def read_idx(path: str | Path, field: str = "task_params.mnist_dir") -> np.ndarray:
    """The array stored in one IDX file (gzip detected from its magic bytes, not its name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror}", FIX) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ConfigError(field, f"{path} is a damaged gzip file ({exc})", FIX) from None
    return parse_idx(raw, str(path), field)


def parse_idx(raw: bytes, name: str, field: str = "task_params.mnist_dir") -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise ConfigError(field, f"{name} is not an IDX file (bad magic {raw[:4].hex() or 'empty'})", FIX)
    dtype = np.dtype(_TYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(field, f"{name}: truncated IDX header", FIX)
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 0
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        raise ConfigError(
            field, f"{name}: {len(raw)} bytes, but the header {shape} of {dtype.name} needs {expected}", FIX
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class Mnist:
    """Images (n, 28, 28) float32 in [0, 1] and labels (n,) int64, for both official halves."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_mnist(path: str | Path, field: str = "task_params.mnist_dir") -> Mnist:
    return _load(str(Path(path).expanduser().resolve()), field)


@lru_cache(maxsize=2)
def _load(path: str, field: str) -> Mnist:
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(field, f"{root} is not a directory", FIX)
    parts = {}
    for key, stem, kind in (
        ("train_x", "train-images", "idx3"),
        ("train_y", "train-labels", "idx1"),
        ("test_x", "t10k-images", "idx3"),
        ("test_y", "t10k-labels", "idx1"),
    ):
        parts[key] = read_idx(_find(root, stem, kind, field), field)
    for half in ("train", "test"):
        x, y = parts[f"{half}_x"], parts[f"{half}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(
                field,
                f"{half}: images {x.shape} and labels {y.shape} do not match",
                "(n, rows, cols) and (n,)",
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise ConfigError(field, f"{half} labels outside 0..9 ({int(y.min())}..{int(y.max())})")
    scale = 255.0 if parts["train_x"].dtype == np.uint8 else 1.0
    log.info("MNIST: %d train, %d test images from %s", len(parts["train_y"]), len(parts["test_y"]), root)
    return Mnist(
        train_x=(parts["train_x"] / scale).astype(np.float32),
        train_y=parts["train_y"].astype(np.int64),
        test_x=(parts["test_x"] / scale).astype(np.float32),
        test_y=parts["test_y"].astype(np.int64),
    )


def _find(root: Path, stem: str, kind: str, field: str) -> Path:
    names = [f"{stem}-{kind}-ubyte", f"{stem}.{kind}-ubyte"]
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    raise ConfigError(field, f"no {names[0]}[.gz] in {root}", FIX)
