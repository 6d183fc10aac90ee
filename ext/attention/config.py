"""The ``[attention]`` and ``[skyladder]`` sections, and what they resolve to.

(No ``from __future__ import annotations``: torchtitan's config merge needs
real field types.)
"""

from dataclasses import dataclass
import logging
from typing import Any, Literal

import torch

from ext.errors import ConfigError

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)

BACKENDS = ("auto", "dense", "flex", "varlen")
SCHEDULES = ("rate", "lin", "sin", "exp")


@dataclass
class Attention:
    """Segment-aware attention of our model specs."""

    document_masking: bool = True
    """
    Tokens attend only to earlier tokens of their own document (segment ids
    from the [data] loader; never inferred from EOS tokens). Needs [data].
    """

    backend: Literal["auto", "dense", "flex", "varlen"] = "auto"
    """
    How masked attention runs: "dense" (boolean mask + SDPA; any device, the
    reference), "flex" (FlexAttention BlockMask; GPU), "varlen" (cu_seqlens +
    flash varlen; GPU, bf16/fp16). "auto": flex with CUDA, dense without.
    Without document masking and SkyLadder, plain causal SDPA is used.
    """


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


def resolve_backend(cfg: Attention, masked: bool, device_is_cuda: bool | None = None) -> str:
    """"none" (plain causal) when nothing is masked, else the concrete backend."""
    if not masked:
        return "none"
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"[attention] backend = {cfg.backend!r}: use one of {list(BACKENDS)}")
    cuda = torch.cuda.is_available() if device_is_cuda is None else device_is_cuda
    if cfg.backend == "auto":
        return "flex" if cuda else "dense"
    if cfg.backend in ("flex", "varlen") and not cuda:
        raise ConfigError(
            f"[attention] backend = {cfg.backend!r} needs a CUDA GPU; use \"dense\" or \"auto\" on CPU"
        )
    return cfg.backend


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
