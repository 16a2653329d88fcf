"""Deterministic randomness keyed by (seed, agent id, purpose, counter).

Every random draw in an agent comes from a generator derived here, never from global state, so a
run is reproducible whether the agents live in one process or in many daemons, and whatever order
requests arrive in.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Purposes, so that two streams of one agent never share a generator.
INIT = 1
DATA = 2
PARAMS = 3
ATTACK = 4
TEST = 5


def id_key(agent_id: str) -> list[int]:
    """A stable 128-bit key of an agent id as four 32-bit words (hash() is salted per process)."""
    digest = hashlib.blake2b(agent_id.encode(), digest_size=16).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def generator(seed: int, agent_id: str, purpose: int, *counters: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *id_key(agent_id), purpose, *counters]))
