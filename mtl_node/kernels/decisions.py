"""Why a neighbour was accepted, filtered or missing: the decision codes and reason texts.

One place for the words in the decision log, so that the daemon's rules (one neighbourhood at a
time) and the vectorized engine (codes per slot, turned into rows on demand) write the same ones.
A code is finer than the public decision so that its reason can be rebuilt from it.
"""

from __future__ import annotations

from typing import Literal

Decision = Literal["accepted", "filtered", "missing"]

# ACCEPTED; FILTERED = worse than self (EMA filter); MISSING = no valid model; NOT_FINITE = score
# NaN/inf (filtered); LEFT_OUT = the row kept only its own model (non-cooperative, own score not
# finite, too few members for a robust rule, combined model not finite); KRUM_OTHER = not the
# member Krum selected; CLIPPED = accepted with its pull clipped (self-clipping); UNBOUNDED = pull
# not finite (filtered); REFUSED = the sender refused (omission); CAPPED = accepted with its weight
# capped; RADIUS_CLIPPED = accepted with its pull clipped to the row's adaptive radius. The
# decentralized defenses (filtered): CLIPPED_AWAY = pull clipped to a radius of 0 (clipped gossip);
# UBAR_FAR = not among the closest; UBAR_LOSS = loss above the agent's own; OUTSIDE_RADIUS =
# beyond BALANCE's radius; IOS_OUT = dropped by IOS.
ACCEPTED, FILTERED, MISSING, NOT_FINITE, LEFT_OUT, KRUM_OTHER, CLIPPED, UNBOUNDED, REFUSED = range(9)
CAPPED, RADIUS_CLIPPED = 9, 10
CLIPPED_AWAY, UBAR_FAR, UBAR_LOSS, OUTSIDE_RADIUS, IOS_OUT = range(11, 16)
DECISION_NAMES: tuple[Decision, ...] = (
    "accepted",
    "filtered",
    "missing",
    "filtered",
    "filtered",
    "filtered",
    "accepted",
    "filtered",
    "missing",
    "accepted",
    "accepted",
    "filtered",
    "filtered",
    "filtered",
    "filtered",
    "filtered",
)
ACCEPTED_CODES = (ACCEPTED, CLIPPED, CAPPED, RADIUS_CLIPPED)
MISSING_CODES = (MISSING, REFUSED)

NON_COOPERATIVE = "non-cooperative"
OWN_NOT_FINITE = "own score not finite; keeping own model"
SCORE_NOT_FINITE = "score not finite"
COMBINED_NOT_FINITE = "combined model not finite; keeping own model"
PULL_NOT_FINITE = "pull not finite"


def worse_than_self(ema: float, own: float) -> str:
    """The EMA filter dropped a neighbour whose running score is above the agent's own."""
    return f"ema {ema:.4g} > own {own:.4g}"


def krum_selected(chosen: str) -> str:
    return f"krum selected {chosen}"


def pull_clipped(tau: float) -> str:
    return f"pull clipped to tau={tau:.4g}"


def weight_capped(cap: float) -> str:
    return f"weight capped at {cap:.4g} x own"


def ubar_far(k: int) -> str:
    """UBAR's distance stage left the neighbour out."""
    return f"not among the {k} closest to own model"


def ubar_loss(loss: float, own: float) -> str:
    return f"loss {loss:.4g} > own {own:.4g}"


def outside_radius(distance: float, radius: float) -> str:
    return f"distance {distance:.4g} > radius {radius:.4g}"


IOS_DROPPED = "dropped: farthest from the mean"
