"""The offline stand-in for MNIST: scikit-learn's bundled handwritten digits, made MNIST-shaped.

``sklearn.datasets.load_digits`` ships 1797 real handwritten digits (UCI "Optical Recognition of
Handwritten Digits", 8x8, 17 grey levels) inside the package, so it needs no download. MNIST
centres a digit in a 20x20 box inside a 28x28 frame; we do the same: 8x8 -> 20x20 (bilinear), a
4-pixel border, values scaled to [0, 1] with ink high, like MNIST.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from mtl_node.core.errors import ConfigError

SIZE = 28
BOX = 20


@lru_cache(maxsize=1)
def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 28, 28) float32 in [0, 1], labels (1797,) int64); read-only arrays."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "task_params.mnist_dir",
            "not given, and scikit-learn (whose bundled digits stand in for MNIST) is not installed",
            "pip install scikit-learn, or give mnist_dir",
        ) from None
    bunch = load_digits()
    images = np.stack([upscale(img / 16.0) for img in bunch.images]).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def upscale(image: np.ndarray) -> np.ndarray:
    """One small grey image in [0, 1] -> 28x28, content resized into the central 20x20 box."""
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize(
        (BOX, BOX), Image.Resampling.BILINEAR
    )
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    pad = (SIZE - BOX) // 2
    out[pad : pad + BOX, pad : pad + BOX] = np.clip(np.asarray(resized), 0.0, 1.0)
    return out
