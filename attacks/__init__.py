"""Byzantine behaviours for attack nodes. Importing this package registers them with mtl_node."""

from attacks import constant as _constant  # noqa: F401

__all__: list[str] = []
