"""Constants of the agent protocol that both ends and the deployment renderers must agree on."""

from __future__ import annotations

# The versioned protobuf package and service (proto/mtl/v1/node.proto); health checks use the name.
PROTOCOL = "mtl.v1"
SERVICE = "mtl.v1.Node"

# The port an agent listens on inside a container or Pod (the n-th agent of a serve-many container
# uses AGENT_PORT + n).
AGENT_PORT = 50051

# Models travel in chunks of at most CHUNK_BYTES; the gRPC message cap on both ends is one chunk
# plus protobuf framing and the header message.
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)
