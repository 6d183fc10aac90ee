"""The ``[attention]`` section, and the backend it resolves to.

(``[skyladder]`` and :func:`masking_requested`, which the loader needs too,
live in :mod:`ext.data.skyladder`.)

(No ``from __future__ import annotations``: torchtitan's config merge needs
real field types.)
"""

from dataclasses import dataclass
from typing import Literal

import torch

from ext.core.errors import ConfigError

BACKENDS = ("auto", "dense", "flex", "varlen")


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
