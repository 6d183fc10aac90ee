"""Run torchtitan 0.2.2 on a machine without an accelerator.

torchtitan copies ``device_type``/``device_module`` into several modules at
import time and assumes CUDA behind them (memory stats, ``set_device``, a
barrier with ``device_ids``). On a CPU-only host this module points those
copies at a small CPU stand-in, so 1-process and multi-process (gloo) runs
work unchanged. FSDP over gloo additionally needs sum-only reductions (gloo
has no PREMUL_SUM), and sharded parameters need per-shard random streams at
initialization; :func:`prepare_sharded_model` applies both.

Everything here is a no-op when torch sees an accelerator, so the same code
path runs on GPU nodes untouched.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import resource
from types import SimpleNamespace
from typing import Any

import torch
from torch._utils import _get_available_device_type

_installed = False


def accelerator_present() -> bool:
    """True when torch sees any accelerator (CUDA, ROCm, XPU, MPS, ...)."""
    return _get_available_device_type() is not None


def _total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CpuDeviceModule:
    """The subset of the ``torch.cuda`` API that torchtitan calls, for the CPU.

    Memory figures are the process's peak resident set size, so the
    "memory" column of the training log stays meaningful on CPU.
    """

    @staticmethod
    def set_device(device: Any) -> None:
        pass

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        pass

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return f"CPU ({platform.processor() or platform.machine()})"

    @staticmethod
    def get_device_properties(device: Any = None) -> SimpleNamespace:
        return SimpleNamespace(total_memory=_total_ram_bytes() or 1)

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        peak = _peak_rss_bytes()
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }


def _set_pg_timeouts_cpu(timeout: Any, parallel_dims: Any) -> None:
    """gloo takes no ``device_ids`` barrier; keep the init-time timeouts."""


def install_cpu_support() -> bool:
    """Patch torchtitan for CPU-only hosts; return True when it patched.

    Idempotent. Does nothing (returns False) when an accelerator is present.
    Must run before the Trainer is constructed; importing ``ext.job_config``
    calls it, which covers both ``run_train.sh`` and the plugin path.
    """
    global _installed
    if accelerator_present():
        return False
    if _installed:
        return True

    import torchtitan.components.metrics as tt_metrics
    import torchtitan.distributed.parallel_dims as tt_parallel_dims
    import torchtitan.distributed.utils as tt_dist_utils
    import torchtitan.tools.profiling as tt_profiling
    import torchtitan.tools.utils as tt_utils

    cpu_module = CpuDeviceModule()
    for module in (tt_utils, tt_dist_utils, tt_metrics):
        module.device_type = "cpu"
        module.device_module = cpu_module
    tt_parallel_dims.device_type = "cpu"
    tt_profiling.device_module = cpu_module
    tt_dist_utils.set_pg_timeouts = _set_pg_timeouts_cpu
    _installed = True
    return True


def prepare_sharded_model(model: torch.nn.Module) -> None:
    """Make FSDP-wrapped modules reduce with plain sums when running on gloo.

    gloo rejects ``ReduceOp.PREMUL_SUM``. torchtitan already sets the FSDP
    gradient divide factor to 1.0 (the loss is pre-divided by the global
    token count), so forcing sum reductions does not change the result.
    Also seeds each shard's initialization apart (:func:`seed_shards_apart`).
    No-op with an accelerator or without FSDP.
    """
    if accelerator_present():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    seed_shards_apart(model)


def shard_index(model: torch.nn.Module) -> tuple[int, int] | None:
    """``(index, count)`` of this rank's shard of the model's DTensor parameters.

    The index runs over the mesh dimensions on which parameters are sharded
    (ranks that hold replicas of the same shard, e.g. across HSDP's replicate
    dimension, share it). None without DTensor parameters, or when parameters
    disagree on mesh or sharded dimensions (e.g. tensor parallel, where norms
    are replicated across a dimension other weights are sharded on): then no
    single per-rank index keeps replicas equal.
    """
    from torch.distributed.tensor import DTensor, Shard

    layouts = set()
    for param in model.parameters():
        if isinstance(param, DTensor):
            sharded = tuple(d for d, pl in enumerate(param.placements) if isinstance(pl, Shard))
            layouts.add((param.device_mesh, sharded))
    if len(layouts) != 1:
        return None
    ((mesh, sharded),) = layouts
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    index, count = 0, 1
    for dim in sharded:
        index = index * mesh.size(dim) + coordinate[dim]
        count *= mesh.size(dim)
    return index, count


def seed_shards_apart(model: torch.nn.Module) -> bool:
    """Give each shard of a CPU-sharded model its own random init stream.

    DTensor keeps one random stream across shards (so a sharded init equals
    the unsharded one) only on CUDA-like devices. On CPU every rank draws its
    local shard from the same seeded CPU generator, so the shards of a
    parameter start as copies of each other: the halves of a 2-way-sharded
    weight are equal, and sharded MoE experts (and their router rows) are
    pairwise clones that never diverge. Here ``model.init_weights`` runs with
    the CPU generator seeded ``initial_seed + shard index`` inside a forked
    RNG, so shards differ and replicas of one shard stay equal. The weights
    then differ from a 1-process init with the same seed (as any sharded CPU
    init must). Returns True when the wrapper was installed.
    """
    if accelerator_present() or not hasattr(model, "init_weights"):
        return False
    found = shard_index(model)
    if found is None:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in model.parameters()):
            logging.getLogger(__name__).warning(
                "CPU run with parameters sharded over different mesh dimensions (tensor "
                "parallel?): their shards are initialized from the same random stream, so "
                "the shards of a weight start as copies of each other"
            )
        return False
    if found[1] < 2:
        return False
    index = found[0]
    init_weights = model.init_weights

    @functools.wraps(init_weights)
    def init_weights_per_shard(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((torch.initial_seed() + index) % 2**64)
            return init_weights(*args, **kwargs)

    model.init_weights = init_weights_per_shard
    return True


def run_device() -> torch.device:
    """The device this rank trains on, as torchtitan's ``device_type`` says
    (set at run time; "cpu" on hosts without an accelerator)."""
    from torchtitan.tools import utils

    if utils.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(utils.device_type, getattr(torch, utils.device_type).current_device())
