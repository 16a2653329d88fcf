"""Agent identifiers: one pattern for agent configs, topologies, file names and DNS labels."""

from __future__ import annotations

import re

# Starts with a letter or digit, at most 63 characters (a DNS label; k8s and Docker names use it).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$"
ID_RE = re.compile(ID_PATTERN)
