"""HAR-shaped data generated offline: 30 subjects, 6 activities, 561 features in [-1, 1].

A stand-in for the UCI HAR data set (mtl_node.data.uci_har) so the case study runs where nothing can
be downloaded. It keeps what the experiment depends on, not the physics:

- the shape: 561 correlated features squashed into [-1, 1] (tanh of a low-rank map of a latent
  activity state, as the real features are many statistics of a few sensor signals), 281-409
  samples per subject with uneven class shares, six activities;
- the structure of the classes: three dynamic activities (walking, upstairs, downstairs) near each
  other, sitting and standing nearly confusable, lying apart, as in the real data;
- subject-specific shifts: each subject moves the latent state (overall and per activity) and
  offsets the features (sensor placement), so every subject is its own, related task, and a model
  trained on other subjects is good but not optimal for this one.

Deterministic in (seed, subject): the shared "world" (feature map, class means) is drawn from the
seed alone, the subject's shifts and samples from (seed, subject), so an agent can generate its own
subject without the other 29.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mtl_node import seeding

FEATURES = 561
CLASSES = 6
SUBJECTS = 30
LATENT = 60
MIN_SAMPLES, MAX_SAMPLES = 281, 409  # per subject in the real data set
# Typical class shares of the real data (walk, up, down, sit, stand, lie).
CLASS_SHARES = np.array([0.167, 0.150, 0.137, 0.173, 0.185, 0.188])


@dataclass(frozen=True)
class World:
    """What all subjects share: the latent-to-feature map and the activities' latent means."""

    mixing: np.ndarray  # (FEATURES, LATENT)
    offset: np.ndarray  # (FEATURES,)
    means: np.ndarray  # (CLASSES, LATENT)


@lru_cache(maxsize=4)
def world(seed: int) -> World:
    rng = seeding.generator(seed, "har-world", seeding.PARAMS)
    # Features depend on a few latent directions each, with uneven strength (like statistics of
    # a few sensor channels), biased towards -1 as many real HAR features are.
    mixing = rng.standard_normal((FEATURES, LATENT)) * rng.uniform(0.2, 1.0, size=(FEATURES, 1))
    mixing *= rng.random((FEATURES, LATENT)) < 0.35
    mixing /= np.sqrt(LATENT * 0.35)
    offset = rng.uniform(-1.2, 0.3, size=FEATURES)
    dynamic = rng.standard_normal(LATENT) * 1.2
    static = -dynamic + rng.standard_normal(LATENT) * 0.3
    means = np.empty((CLASSES, LATENT))
    for c in range(3):  # walking, upstairs, downstairs: one family
        means[c] = dynamic + rng.standard_normal(LATENT) * 0.55
    sit_stand = static + rng.standard_normal(LATENT) * 0.3
    means[3] = sit_stand + rng.standard_normal(LATENT) * 0.22  # sitting
    means[4] = sit_stand + rng.standard_normal(LATENT) * 0.22  # standing
    means[5] = static + rng.standard_normal(LATENT) * 0.9  # lying: far from both
    return World(mixing=mixing, offset=offset, means=means)


def generate_subject(seed: int, subject: int, samples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, 561) float32 in [-1, 1], y (n,) int64 in 0..5) of one subject, 1 <= subject.

    Fresh arrays each call (the caller may write into them); the draws are made once per
    (seed, subject, samples) in a process: a sim run of several rules, or both engines in a
    benchmark, build the same 30 subjects once per rule, and drawing them is most of a HAR run's
    set-up (~15 ms a subject)."""
    if subject < 1:
        raise ValueError(f"subject must be >= 1, got {subject}")
    x, y = _generate(seed, subject, samples)
    return x.copy(), y.copy()


@lru_cache(maxsize=64)
def _generate(seed: int, subject: int, samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    w = world(seed)
    rng = seeding.generator(seed, f"har-subject-{subject}", seeding.DATA)
    n = int(rng.integers(MIN_SAMPLES, MAX_SAMPLES + 1)) if samples is None else samples
    shares = rng.dirichlet(40.0 * CLASS_SHARES)
    y = rng.choice(CLASSES, size=n, p=shares)
    # The subject's own way of doing things: an overall shift, a per-activity shift, its own
    # noise level, and its own sensor offsets in feature space.
    shift = rng.standard_normal(LATENT) * 0.15
    per_class = rng.standard_normal((CLASSES, LATENT)) * 0.15
    spread = rng.uniform(0.9, 1.3)
    sensor = rng.standard_normal(FEATURES) * 0.1
    z = w.means[y] + shift + per_class[y] + spread * rng.standard_normal((n, LATENT))
    x = np.tanh(z @ w.mixing.T + w.offset + sensor + 0.5 * rng.standard_normal((n, FEATURES)))
    return x.astype(np.float32), y.astype(np.int64)
