"""What machine a benchmark ran on, for the JSON results and docs/performance.md."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import Any


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def describe() -> dict[str, Any]:
    import grpc
    import numpy
    import torch

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_1m": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }
