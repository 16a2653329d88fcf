"""Alias of :mod:`mtl_node.core.registry`, kept so that existing imports go on working."""

from mtl_node.core.registry import Entry, Registry

__all__ = ["Entry", "Registry"]
