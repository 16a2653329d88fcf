"""resilient-mtl agent daemon: one agent of a Byzantine-resilient distributed multi-task network.

Layering (imports point one way): ``wire`` <- ``server``/``client`` <- ``agent`` (round loop) <- ``cli``.
``aggregation`` and ``tasks`` are pure (no grpc import) so they can be unit-tested and reused by the
in-process engine.
"""

__version__ = "0.1.0"
PROTOCOL = "mtl.v1"
