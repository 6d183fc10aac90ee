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

import numpy as np


class Mixture:
    def __init__(self, probs: list[float], unit: str = "tokens"):
        self.probs = np.asarray(probs, dtype=np.float64)
        self.unit = unit
        self.consumed = np.zeros(len(probs), dtype=np.float64)
        self.active = self.probs > 0

    def pick(self) -> int | None:
        """Index of the source to read next, or None when every source is spent."""
        if not self.active.any():
            return None
        ratio = np.where(self.active, self.consumed / np.where(self.active, self.probs, 1.0), np.inf)
        return int(np.argmin(ratio))

    def record(self, source: int, n_tokens: int) -> None:
        self.consumed[source] += n_tokens if self.unit == "tokens" else 1

    def drop(self, source: int) -> None:
        self.active[source] = False

    def state(self) -> dict[str, list]:
        return {"consumed": self.consumed.tolist(), "active": self.active.tolist()}

    def restore(self, state: dict[str, list]) -> None:
        self.consumed = np.asarray(state["consumed"], dtype=np.float64)
        self.active = np.asarray(state["active"], dtype=bool)


def redistribute_mixture(states: list[dict[str, list]], n_new: int) -> dict[str, list]:
    """One new reader's mixture state after a layout change: the old readers'
    consumed counters summed and split evenly (so each new reader starts at the
    global realized shares and keeps correcting towards the targets); a source
    is active where any old reader still had it."""
    consumed = np.sum([np.asarray(s["consumed"], np.float64) for s in states], axis=0) / n_new
    active = np.any([np.asarray(s["active"], bool) for s in states], axis=0)
    return {"consumed": consumed.tolist(), "active": active.tolist()}
