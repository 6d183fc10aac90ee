"""Wrap torchtitan's parallelize functions with the fixes every spec needs.

torchtitan 0.2.2 divides the loss by the *global* number of valid tokens
(all-reduced over the data-parallel mesh) and then lets pure DDP
(``replicate``) average gradients over the ranks once more, so gradients
come out ``1/dp`` too small and gradient clipping acts on the wrong norm.
FSDP/HSDP do not have this bug (torchtitan sets their divide factor to 1).
:func:`with_extension_fixes` installs a DDP communication hook that sums
instead of averaging, and the CPU/gloo adjustment for FSDP.

(No ``from __future__ import annotations`` here: DDP checks the hook's
annotations at registration and rejects string ones.)
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from ext.core.device import prepare_sharded_model


def _allreduce_sum_hook(
    process_group: dist.ProcessGroup, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce a gradient bucket with SUM, no averaging."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def sum_ddp_gradients(model: nn.Module, parallel_dims: ParallelDims) -> bool:
    """Make a ``replicate``-wrapped model sum gradients over the DDP mesh.

    Returns True when a hook was installed (pure DDP), False otherwise.
    """
    if not parallel_dims.dp_replicate_enabled or parallel_dims.fsdp_enabled:
        return False
    group = parallel_dims.get_mesh("dp_replicate").get_group()
    # composable replicate() queues the hook until its lazy init at first forward
    model.register_comm_hook(group, _allreduce_sum_hook)
    return True


def host_group() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for host-side agreements (flags, small
    objects) that must not wait on GPU streams; None with one process. Building
    it is a collective: every rank calls this at the same point."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")


def reduce_host_int(value: int, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> int:
    """``value`` reduced with ``op`` over ``group`` (a :func:`host_group`); ``value`` without one."""
    if group is None:
        return value
    flag = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(flag, op=op, group=group)
    return int(flag.item())


def with_extension_fixes(
    parallelize_fn: Callable[[nn.Module, ParallelDims, JobConfig], nn.Module],
) -> Callable[[nn.Module, ParallelDims, JobConfig], nn.Module]:
    """Return ``parallelize_fn`` followed by the DDP-scale and gloo fixes."""

    def parallelize(
        model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig
    ) -> nn.Module:
        model = parallelize_fn(model, parallel_dims, job_config)
        sum_ddp_gradients(model, parallel_dims)
        prepare_sharded_model(model)
        return model

    parallelize.__name__ = f"{getattr(parallelize_fn, '__name__', 'parallelize')}_ext"
    parallelize.__doc__ = parallelize_fn.__doc__
    return parallelize
