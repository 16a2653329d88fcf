"""Alias of :mod:`mtl_node.core.errors`, kept so that existing imports go on working.

New code imports ``mtl_node.core.errors``; this module re-exports the same classes (the very same
objects, so ``except`` clauses match either spelling).
"""

from mtl_node.core.errors import (
    BadPayload,
    ConfigError,
    DigestMismatch,
    FetchError,
    ManifestMismatch,
    MTLError,
    NonFiniteModel,
    PayloadTooLarge,
    TruncatedPayload,
    UnknownNameError,
    WireError,
)

__all__ = [
    "BadPayload",
    "ConfigError",
    "DigestMismatch",
    "FetchError",
    "MTLError",
    "ManifestMismatch",
    "NonFiniteModel",
    "PayloadTooLarge",
    "TruncatedPayload",
    "UnknownNameError",
    "WireError",
]
