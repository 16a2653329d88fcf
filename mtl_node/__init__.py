"""resilient-mtl agent daemon: one agent of a Byzantine-resilient distributed multi-task network.

Layering (imports point one way): ``wire`` <- ``server``/``client`` <- ``agent`` (round loop) <- ``cli``.
``aggregation`` and ``tasks`` are pure (no grpc import) so they can be unit-tested and reused by the
in-process engine. ``core`` (errors, ids, protocol constants, names) imports neither torch nor
grpc: the orchestrator builds on it. pyproject.toml's import-linter contracts check all this.
"""

from mtl_node.core.protocol import PROTOCOL

__version__ = "0.1.0"

__all__ = ["PROTOCOL", "__version__"]
