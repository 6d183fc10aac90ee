"""Global seeding: torch (torchtitan's), Python, NumPy, DataLoader workers.

torchtitan's ``set_determinism`` seeds torch's generators from ``[debug]
seed`` (the same seed on every rank, so weights initialize identically; a
per-stage offset under pipeline parallelism) and applies ``[debug]
deterministic``. It leaves Python's and NumPy's global generators alone;
:func:`install` wraps it so that they are seeded too, with ``seed + global
rank`` (ranks must differ wherever they draw random numbers of their own).
DataLoader workers get :func:`seed_worker`, deriving their Python and NumPy
seeds from the per-worker torch seed that torch already assigns.

torchtitan 0.2.2 calls the seed ``[debug] seed``; we honour that key rather
than adding a second name for it. Our loader does not depend on any global
generator: its shuffles are keyed by (seed, source, reader, epoch).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

_installed = False


def seed_host_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: Python and NumPy follow the worker's torch seed."""
    seed_host_rngs(torch.initial_seed())


def install() -> None:
    """Wrap torchtitan's ``set_determinism`` (idempotent)."""
    global _installed
    if _installed:
        return
    import torchtitan.distributed.utils as dist_utils

    original = dist_utils.set_determinism

    def set_determinism(parallel_dims: Any, device: Any, debug_config: Any, *args: Any, **kwargs: Any) -> None:
        original(parallel_dims, device, debug_config, *args, **kwargs)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        base = debug_config.seed if debug_config.seed is not None else torch.initial_seed()
        seed_host_rngs(base + rank)

    dist_utils.set_determinism = set_determinism
    _installed = True
