"""Which source the next document comes from.

Deterministic deficit scheduling: the next document is taken from the active
source that is furthest behind its target share, i.e. with the smallest
``consumed / prob`` (ties: lowest index). With ``unit = "tokens"``,
``consumed`` counts tokens, so the realized token shares track the targets to
within one document at every point of the stream; with ``"documents"`` it
counts documents. Dropping a source renormalizes the others implicitly. The
whole state is the consumed counters, which makes resume exact.
"""

from __future__ import annotations

import math

import numpy as np


class Mixture:
    """The counters live in Python lists: :meth:`pick` runs once per document,
    and for the few sources a mixture has a plain loop costs a fraction of
    numpy's per-call overhead (the float64 arithmetic is the same)."""

    def __init__(self, probs: list[float], unit: str = "tokens"):
        self.probs = [float(p) for p in probs]
        self.unit = unit
        self.consumed = [0.0] * len(self.probs)
        self.active = [p > 0 for p in self.probs]

    def pick(self) -> int | None:
        """Index of the source to read next, or None when every source is spent."""
        best, best_ratio = None, math.inf
        for i, (consumed, prob, active) in enumerate(zip(self.consumed, self.probs, self.active)):
            if active:
                ratio = consumed / prob
                if best is None or ratio < best_ratio:
                    best, best_ratio = i, ratio
        return best

    def record(self, source: int, n_tokens: int) -> None:
        self.consumed[source] += n_tokens if self.unit == "tokens" else 1

    def drop(self, source: int) -> None:
        self.active[source] = False

    def state(self) -> dict[str, list]:
        return {"consumed": list(self.consumed), "active": list(self.active)}

    def restore(self, state: dict[str, list]) -> None:
        self.consumed = [float(c) for c in state["consumed"]]
        self.active = [bool(a) for a in state["active"]]


def redistribute_mixture(states: list[dict[str, list]], n_new: int) -> dict[str, list]:
    """One new reader's mixture state after a layout change: the old readers'
    consumed counters summed and split evenly (so each new reader starts at the
    global realized shares and keeps correcting towards the targets); a source
    is active where any old reader still had it."""
    consumed = np.sum([np.asarray(s["consumed"], np.float64) for s in states], axis=0) / n_new
    active = np.any([np.asarray(s["active"], bool) for s in states], axis=0)
    return {"consumed": consumed.tolist(), "active": active.tolist()}
