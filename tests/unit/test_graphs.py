"""Graph generators: degrees, ranges, determinism, edge conventions."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator import graphs


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_well_formed(nbrs: graphs.Neighbourhoods, n: int) -> None:
    assert len(nbrs) == n
    for k, row in enumerate(nbrs):
        assert k not in row, "an agent is never listed as its own neighbour"
        assert list(row) == sorted(set(row)), "neighbours are sorted and unique"
        assert all(0 <= j < n for j in row)


def test_complete() -> None:
    nbrs = graphs.complete(6)
    assert_well_formed(nbrs, 6)
    assert all(len(row) == 5 for row in nbrs)
    assert graphs.is_symmetric(nbrs)


def test_complete_single_agent_has_no_neighbours() -> None:
    assert graphs.complete(1) == [()]


@pytest.mark.parametrize(("n", "k"), [(10, 1), (10, 2), (7, 3), (12, 5)])
def test_ring_degrees(n: int, k: int) -> None:
    nbrs = graphs.ring(n, k)
    assert_well_formed(nbrs, n)
    assert all(len(row) == 2 * k for row in nbrs)
    assert graphs.is_symmetric(nbrs)
    # neighbours are the k nearest on each side, by ring distance
    for i, row in enumerate(nbrs):
        assert all(min((i - j) % n, (j - i) % n) <= k for j in row)


def test_ring_wider_than_the_ring_is_complete() -> None:
    assert graphs.ring(5, 4) == graphs.complete(5)


@pytest.mark.parametrize(("n", "k"), [(10, 3), (20, 4), (100, 9), (9, 2), (6, 5), (5, 0)])
def test_k_regular_degrees(n: int, k: int) -> None:
    nbrs = graphs.k_regular(n, k, rng(1))
    assert_well_formed(nbrs, n)
    assert all(len(row) == k for row in nbrs)
    assert graphs.is_symmetric(nbrs)


def test_k_regular_is_deterministic_by_generator_seed() -> None:
    assert graphs.k_regular(30, 4, rng(5)) == graphs.k_regular(30, 4, rng(5))
    assert graphs.k_regular(30, 4, rng(5)) != graphs.k_regular(30, 4, rng(6))


@pytest.mark.parametrize(("n", "k"), [(5, 3), (4, 4), (4, -1)])
def test_k_regular_impossible(n: int, k: int) -> None:
    with pytest.raises(ValueError, match="regular"):
        graphs.k_regular(n, k, rng())


def test_geometric_respects_radius_and_max_degree() -> None:
    positions = rng(3).uniform(0, 3, size=(100, 2))
    nbrs = graphs.geometric(positions, 1.0, 10, rng(4))
    assert_well_formed(nbrs, 100)
    for k, row in enumerate(nbrs):
        assert len(row) <= 9, "max_degree counts the agent itself"
        for j in row:
            assert np.linalg.norm(positions[k] - positions[j]) <= 1.0
        in_range = sum(1 for j in range(100) if j != k and np.linalg.norm(positions[k] - positions[j]) <= 1.0)
        assert len(row) == min(in_range, 9), "keeps everything in range up to the cap"
    # with 100 agents in [0,3]^2 and range 1 many agents have more than 9 in range: the cap binds
    assert sum(len(row) == 9 for row in nbrs) > 10


def test_geometric_without_cap_is_the_symmetric_disc_graph() -> None:
    positions = rng(3).uniform(0, 3, size=(40, 2))
    nbrs = graphs.geometric(positions, 0.8, None, rng(4))
    assert graphs.is_symmetric(nbrs)
    for k in range(40):
        expected = [j for j in range(40) if j != k and np.linalg.norm(positions[k] - positions[j]) <= 0.8]
        assert list(nbrs[k]) == expected


def test_geometric_capped_sampling_is_per_agent_so_may_be_directed() -> None:
    positions = rng(3).uniform(0, 3, size=(100, 2))
    nbrs = graphs.geometric(positions, 1.0, 10, rng(4))
    assert not graphs.is_symmetric(nbrs)


def test_geometric_is_deterministic_by_seed() -> None:
    positions = rng(3).uniform(0, 3, size=(100, 2))
    a = graphs.geometric(positions, 1.0, 10, rng(4))
    b = graphs.geometric(positions, 1.0, 10, rng(4))
    c = graphs.geometric(positions, 1.0, 10, rng(5))
    assert a == b
    assert a != c


def test_geometric_radius_boundary_is_inclusive() -> None:
    positions = np.array([[0.0, 0.0], [1.0, 0.0], [2.5, 0.0]])
    assert graphs.geometric(positions, 1.0, None, rng()) == [(1,), (0,), ()]


@pytest.mark.parametrize("n", [1, 2, 15])
def test_erdos_renyi_extremes(n: int) -> None:
    assert graphs.erdos_renyi(n, 0.0, rng()) == [() for _ in range(n)]
    assert graphs.erdos_renyi(n, 1.0, rng()) == graphs.complete(n)


def test_erdos_renyi_is_undirected_and_density_follows_p() -> None:
    nbrs = graphs.erdos_renyi(200, 0.3, rng(9))
    assert_well_formed(nbrs, 200)
    assert graphs.is_symmetric(nbrs)
    density = sum(len(r) for r in nbrs) / (200 * 199)
    assert 0.25 < density < 0.35


def test_explicit_edges_undirected_vs_directed() -> None:
    edges = [(0, 1), (1, 2), (3, 1)]
    assert graphs.from_edges(4, edges, directed=False) == [(1,), (0, 2, 3), (1,), (1,)]
    # directed (l, k): k fetches from l
    assert graphs.from_edges(4, edges, directed=True) == [(), (0, 3), (1,), ()]


def test_explicit_edges_reject_self_loop() -> None:
    with pytest.raises(ValueError, match="self-loop"):
        graphs.from_edges(3, [(1, 1)], directed=True)


def test_adjacency_as_given_or_symmetrised() -> None:
    adj = {0: [2, 1], 2: [1]}
    assert graphs.from_adjacency(3, adj, directed=True) == [(1, 2), (), (1,)]
    assert graphs.from_adjacency(3, adj, directed=False) == [(1, 2), (0, 2), (0, 1)]


def test_two_cluster() -> None:
    nbrs = graphs.two_cluster(10, bridges=2)
    assert_well_formed(nbrs, 10)
    assert graphs.is_symmetric(nbrs)
    # clusters 0..4 and 5..9, complete inside; bridges 0-5 and 2-7 (b * 5 // 2 = 0, 2)
    cross = sorted((k, j) for k, row in enumerate(nbrs) for j in row if (k < 5) != (j < 5) and k < j)
    assert cross == [(0, 5), (2, 7)]
    assert [len(row) for row in nbrs] == [5, 4, 5, 4, 4, 5, 4, 5, 4, 4]
    assert graphs.two_cluster(7, bridges=0)[6] == (3, 4, 5)  # odd n: the second cluster is larger
    with pytest.raises(ValueError, match="bridges"):
        graphs.two_cluster(6, bridges=4)
