"""Data sources of the classification case studies: loaders for the real file formats (UCI HAR,
MNIST IDX) and offline stand-ins that ship or are generated (HAR-shaped generator, scikit-learn's
bundled digits, font-rendered synthetic digits), because nothing can be downloaded at run time.

Every loader raises ``ConfigError`` naming the task parameter that pointed at the bad input, so a
wrong path is one clear line, not a traceback. Pure numpy (and Pillow for rendering): no torch.
"""

from mtl_node.data.har_synthetic import generate_subject
from mtl_node.data.idx import load_mnist, read_idx
from mtl_node.data.sklearn_digits import bundled_digits
from mtl_node.data.synthetic_digits import render_digits
from mtl_node.data.uci_har import HarData, load_uci_har

__all__ = [
    "HarData",
    "bundled_digits",
    "generate_subject",
    "load_mnist",
    "load_uci_har",
    "read_idx",
    "render_digits",
]
