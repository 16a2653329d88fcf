"""Graph generators over agent indices 0..n-1. Pure numpy, no torch.

Every generator returns ``Neighbourhoods``: for each agent k, the sorted indices of the agents k
fetches models from (its neighbourhood N_k without k itself). Sorting matters: the rules aggregate
in this order, and float sums depend on it, so a run is only reproducible with a fixed order.

The convention of the paper is followed: N_k = {l : (l, k) in E}, so a directed edge (l, k) puts
l in k's neighbourhood.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

Neighbourhoods = list[tuple[int, ...]]


def _finish(sets: Sequence[set[int]]) -> Neighbourhoods:
    return [tuple(sorted(s)) for s in sets]


def complete(n: int) -> Neighbourhoods:
    return [tuple(j for j in range(n) if j != k) for k in range(n)]


def ring(n: int, k: int) -> Neighbourhoods:
    """Agent i linked to i±1..i±k (mod n); with 2k >= n-1 this is the complete graph."""
    sets: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        for d in range(1, k + 1):
            for j in ((i + d) % n, (i - d) % n):
                if j != i:
                    sets[i].add(j)
    return _finish(sets)


def two_cluster(n: int, bridges: int = 2) -> Neighbourhoods:
    """Two complete clusters (agents 0..n//2-1 and n//2..n-1) joined by ``bridges`` undirected links.

    Bridge b links agent b * a // bridges of the first cluster (a = n//2 agents) to agent
    a + b * (n - a) // bridges of the second, so bridges are spread over both clusters and every
    agent has at most one. The sparse cut between two dense groups is where a robust rule's
    neighbourhood statistics are dominated by whichever side an agent sits on.
    """
    a = n // 2
    if n < 2 or not 0 <= bridges <= min(a, n - a):
        raise ValueError(f"two clusters of {a} and {n - a} agents cannot have {bridges} bridges")
    sets: list[set[int]] = [set() for _ in range(n)]
    for lo, hi in ((0, a), (a, n)):
        for i in range(lo, hi):
            sets[i].update(j for j in range(lo, hi) if j != i)
    for b in range(bridges):
        i, j = b * a // bridges, a + b * (n - a) // bridges
        sets[i].add(j)
        sets[j].add(i)
    return _finish(sets)


def geometric(
    positions: np.ndarray, radius: float, max_degree: int | None, rng: np.random.Generator
) -> Neighbourhoods:
    """Agents within ``radius`` (inclusive), at most ``max_degree - 1`` of them kept per agent.

    As the reference code's findNeighbors: ``max_degree`` counts the agent itself, and when more
    agents are in range each agent samples its own subset, so l in N_k does not imply k in N_l.
    """
    pos = np.asarray(positions, dtype=np.float64)
    n = len(pos)
    dist = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(axis=-1))
    out: Neighbourhoods = []
    for k in range(n):
        in_range = [j for j in range(n) if j != k and dist[k, j] <= radius]
        if max_degree is not None and len(in_range) > max_degree - 1:
            keep = rng.choice(len(in_range), size=max_degree - 1, replace=False)
            in_range = [in_range[i] for i in keep]
        out.append(tuple(sorted(in_range)))
    return out


def erdos_renyi(n: int, p: float, rng: np.random.Generator) -> Neighbourhoods:
    """Undirected G(n, p): one draw per unordered pair, in a fixed order."""
    draws = rng.random((n, n))
    linked = np.triu(draws < p, k=1)
    linked = linked | linked.T
    return [tuple(int(j) for j in np.flatnonzero(linked[k])) for k in range(n)]


def k_regular(n: int, k: int, rng: np.random.Generator, attempts: int = 1000) -> Neighbourhoods:
    """A random undirected k-regular graph (pairing with Steger-Wormald style restarts).

    Stubs (k per agent) are shuffled and paired; pairs that would make a loop or a double edge are
    put back and re-paired, and the whole attempt restarts when what is left cannot be paired.
    """
    if k < 0 or k >= n or (n * k) % 2:
        raise ValueError(f"no {k}-regular graph on {n} agents (need 0 <= k < n and n*k even)")
    if k == 0:
        return [() for _ in range(n)]
    if k == n - 1:
        return complete(n)
    for _ in range(attempts):
        edges = _try_pairing(n, k, rng)
        if edges is not None:
            sets: list[set[int]] = [set() for _ in range(n)]
            for a, b in edges:
                sets[a].add(b)
                sets[b].add(a)
            return _finish(sets)
    raise RuntimeError(f"could not draw a {k}-regular graph on {n} agents in {attempts} attempts")


def _try_pairing(n: int, k: int, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    edges: set[tuple[int, int]] = set()
    stubs = [i for i in range(n) for _ in range(k)]
    while stubs:
        rng.shuffle(stubs)
        left: list[int] = []
        for s1, s2 in zip(stubs[0::2], stubs[1::2], strict=True):
            a, b = min(s1, s2), max(s1, s2)
            if a != b and (a, b) not in edges:
                edges.add((a, b))
            else:
                left += [s1, s2]
        if left and not _pairable(left, edges):
            return None
        stubs = left
    return edges


def _pairable(stubs: list[int], edges: set[tuple[int, int]]) -> bool:
    """Whether at least one new edge can still be made from the remaining stubs."""
    nodes = sorted(set(stubs))
    return any((a, b) not in edges for i, a in enumerate(nodes) for b in nodes[i + 1 :])


def from_edges(n: int, edges: Iterable[tuple[int, int]], directed: bool) -> Neighbourhoods:
    """Edge (a, b): b fetches from a; undirected edges also make a fetch from b."""
    sets: list[set[int]] = [set() for _ in range(n)]
    for a, b in edges:
        if a == b:
            raise ValueError(f"self-loop on agent index {a}")
        sets[b].add(a)
        if not directed:
            sets[a].add(b)
    return _finish(sets)


def from_adjacency(n: int, adjacency: Mapping[int, Iterable[int]], directed: bool) -> Neighbourhoods:
    """adjacency[k] = the agents k fetches from; undirected also adds the reverse links."""
    sets: list[set[int]] = [set() for _ in range(n)]
    for k, nbrs in adjacency.items():
        for j in nbrs:
            if j == k:
                raise ValueError(f"agent index {k} lists itself")
            sets[k].add(j)
            if not directed:
                sets[j].add(k)
    return _finish(sets)


def is_symmetric(nbrs: Neighbourhoods) -> bool:
    return all(k in nbrs[j] for k, row in enumerate(nbrs) for j in row)
