"""The exception tree of resilient-mtl.

Callers catch ``MTLError`` for everything this package raises on purpose. ``ConfigError`` is a
user mistake (the CLI prints its message and exits 2); ``WireError`` is a model received from the
network that failed validation (the round loop leaves that neighbour out and counts it);
``FetchError`` is a neighbour that did not answer in time.
"""

from __future__ import annotations

from collections.abc import Iterable


class MTLError(Exception):
    """Base of every error resilient-mtl raises deliberately."""


class ConfigError(MTLError, ValueError):
    """Invalid configuration, flag or topology: says which field and how to fix it."""

    def __init__(self, field: str, problem: str, fix: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        message = f"{field}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class UnknownNameError(ConfigError):
    """A name that is not in a registry (rule, task, attack, backend)."""

    def __init__(self, family: str, name: str, valid: Iterable[str], field: str | None = None):
        self.family = family
        self.valid = sorted(valid)
        super().__init__(
            field or family,
            f"unknown {family} {name!r}",
            f"valid {family}s: {', '.join(self.valid)}",
        )


class WireError(MTLError):
    """A received model was rejected; ``reason`` is a short machine-friendly tag."""

    reason = "invalid"


class PayloadTooLarge(WireError):
    reason = "oversized"


class TruncatedPayload(WireError):
    reason = "truncated"


class DigestMismatch(WireError):
    reason = "digest"


class ManifestMismatch(WireError):
    reason = "manifest"


class NonFiniteModel(WireError):
    reason = "non-finite"


class BadPayload(WireError):
    reason = "format"


class FetchError(MTLError):
    """A neighbour could not be reached, timed out or refused; ``reason`` tags why."""

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason
