"""How daemons started together learn each other's addresses while no two processes share a port.

DESIGN §5 "One owner per port": serving sockets are bound without SO_REUSEPORT, so a port cannot be
reserved by one process and handed to another. Instead every daemon binds its own port (port 0:
the kernel picks a free one, so there is no race to lose), prints ``mtl-node: serving ID on
HOST:PORT``, and waits for its ``peers_file``. Whoever started the daemons reads those lines
(``serving_addresses``) and writes the file once all are bound (``write_peers_file``, atomically:
a daemon never reads half a file). Rounds start only then.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

SERVING = re.compile(r"^mtl-node: serving (\S+) on (\S+)$", re.MULTILINE)


def serving_addresses(text: str) -> dict[str, str]:
    """agent id -> HOST:PORT from the serving lines in a daemon's stdout."""
    return {m.group(1): m.group(2) for m in SERVING.finditer(text)}


def write_peers_file(path: Path, addresses: Mapping[str, str]) -> None:
    """Write ``{id: HOST:PORT}`` so that readers see the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(addresses), indent=1))
    os.replace(tmp, path)
