"""SkyLadder context-window scheduling (arXiv 2503.15450).

The attention window grows with the optimizer step; a row is cut into fixed
fragments of that window (not a sliding window), each attended causally.
With document masking the cuts are the union of document boundaries and the
grid {w, 2w, ...} from the row start. Positions are left as they are (the
paper keeps absolute positions). The window depends only on the step, so the
loader computes it from its own checkpointed row counter and emits fragments
as segments: nothing in the model knows about SkyLadder.

(No ``from __future__ import annotations``: torchtitan's config merge needs
real field types.)
"""

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ext.core.errors import ConfigError

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


SCHEDULES = ("rate", "lin", "sin", "exp")


@dataclass
class SkyLadder:
    """SkyLadder context-window scheduling (arXiv 2503.15450)."""

    enable: bool = False
    """Cut rows into fragments of a window that grows with the optimizer step."""

    schedule: Literal["rate", "lin", "sin", "exp"] = "rate"
    """
    "rate": w = min(L, init_window + floor(step / rate)). "lin", "sin", "exp":
    from init_window to L over the horizon (linear, sine, exponential), then L.
    """

    init_window: int = 32
    """Window at step 0, in tokens."""

    rate: int = 8
    """"rate" schedule: optimizer steps per +1 token of window (the paper's default 8)."""

    horizon_steps: int = 0
    """Steps to reach the full window for lin/sin/exp (0: use horizon_fraction)."""

    horizon_fraction: float = 0.0
    """Horizon as a fraction of training.steps, when horizon_steps is 0."""

    rounding: int = 0
    """Round the window down to a multiple of this (0: no rounding); init_window if that gives 0."""

    max_window: int = 0
    """Full window L (0: training.seq_len)."""


def masking_requested(job_config: Any) -> bool:
    """Whether this run masks attention by segments (documents and/or SkyLadder)."""
    uses_loader = bool(getattr(getattr(job_config, "data", None), "datasets", None))
    attention = getattr(job_config, "attention", None)
    skyladder = getattr(job_config, "skyladder", None)
    wants = bool(attention and attention.document_masking) or bool(skyladder and skyladder.enable)
    if wants and not uses_loader:
        _warn_once(
            "[attention] document masking / [skyladder] need segment ids from the [data] "
            "loader, which is not configured: attention stays plain causal"
        )
        return False
    return wants


def skyladder_horizon(cfg: SkyLadder, total_steps: int) -> int:
    if cfg.horizon_steps > 0:
        return cfg.horizon_steps
    return max(1, round(cfg.horizon_fraction * total_steps))


def validate_skyladder(cfg: SkyLadder, seq_len: int, total_steps: int) -> int:
    """Check ``[skyladder]``; return the full window L."""
    full = cfg.max_window or seq_len
    if not cfg.enable:
        return full
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"[skyladder] schedule = {cfg.schedule!r}: use one of {list(SCHEDULES)}")
    if not 1 <= cfg.init_window <= full:
        raise ConfigError(
            f"[skyladder] init_window = {cfg.init_window}: must be between 1 and the full window {full}"
        )
    if full > seq_len:
        raise ConfigError(f"[skyladder] max_window = {full} exceeds training.seq_len = {seq_len}")
    if cfg.schedule == "rate" and cfg.rate < 1:
        raise ConfigError(f"[skyladder] rate = {cfg.rate}: must be >= 1 step per token")
    if cfg.schedule != "rate" and cfg.horizon_steps <= 0 and not 0 < cfg.horizon_fraction <= 1:
        raise ConfigError(
            f"[skyladder] schedule {cfg.schedule!r} needs horizon_steps > 0 or 0 < horizon_fraction <= 1"
        )
    if cfg.rounding < 0:
        raise ConfigError(f"[skyladder] rounding = {cfg.rounding}: must be >= 0")
    if cfg.rounding > full:
        raise ConfigError(
            f"[skyladder] rounding = {cfg.rounding} exceeds the full window {full}: "
            "every window would round to init_window; use a rounding <= the full window (or 0)"
        )
    return full


def skyladder_window(cfg: SkyLadder, step: int, full: int, total_steps: int) -> int:
    """Attention window for optimizer step ``step`` (0 = the first step).

    ``rounding`` R floors windows below the full one to a multiple of R
    (``init_window`` if that gives 0); the full window ``full`` itself is
    never rounded, so the schedule ends at exactly ``full`` even when it is
    not a multiple of R.
    """
    w0, L = cfg.init_window, full
    if cfg.schedule == "rate":
        w = min(L, w0 + step // cfg.rate)
    else:
        horizon = skyladder_horizon(cfg, total_steps)
        x = min(step / horizon, 1.0)
        if cfg.schedule == "lin":
            w = w0 + (L - w0) * x
        elif cfg.schedule == "sin":
            w = w0 + (L - w0) * math.sin(math.pi / 2 * x)
        else:
            w = w0 * (L / w0) ** x
        w = L if x >= 1.0 else min(L, int(w))
    if cfg.rounding > 0 and w < L:
        w = (w // cfg.rounding) * cfg.rounding or w0
    return int(w)


def fragment_segments(segment_ids: np.ndarray, window: int) -> np.ndarray:
    """Split every segment of ``segment_ids`` (``[..., S]``) at the grid
    {window, 2 window, ...} measured from the row start; returns new ids."""
    seq = segment_ids.shape[-1]
    fragment = np.arange(seq, dtype=np.int64) // window
    return segment_ids.astype(np.int64) * (seq // window + 1) + fragment


@dataclass(frozen=True)
class WindowClock:
    """The window of each row a loader worker yields, from its own row count.

    torchdata hands out batches round-robin over workers, so the ``j``-th
    batch of worker ``w`` is global batch ``j * n_workers + w``, and
    ``grad_accum`` batches make one optimizer step.
    """

    cfg: SkyLadder
    full: int
    total_steps: int
    local_batch: int
    grad_accum: int
    within_documents: bool = True
    """Cut documents too (document masking on); False: only the window grid."""

    def step_of_row(self, rows_out: int, worker: int, n_workers: int, base: int = 0) -> int:
        """``base``: the rank's batches before this layout began (a resume on
        another layout restarts the round-robin at worker 0)."""
        batch = base + (rows_out // self.local_batch) * n_workers + worker
        return batch // self.grad_accum

    def window_of_row(self, rows_out: int, worker: int, n_workers: int, base: int = 0) -> int:
        step = self.step_of_row(rows_out, worker, n_workers, base)
        return skyladder_window(self.cfg, step, self.full, self.total_steps)
