"""Byzantine behaviours for attack nodes. Importing this package registers them with mtl_node.

``mtl-node attacks`` lists them with their parameters; each class docstring gives its exact maths.
"""

from attacks import adaptive as _adaptive  # noqa: F401
from attacks import backdoor as _backdoor  # noqa: F401
from attacks import capture as _capture  # noqa: F401
from attacks import constant as _constant  # noqa: F401
from attacks import disagreement as _disagreement  # noqa: F401
from attacks import label_flip as _label_flip  # noqa: F401
from attacks import noise as _noise  # noqa: F401
from attacks import statistical as _statistical  # noqa: F401
from attacks import timing as _timing  # noqa: F401

__all__: list[str] = []
