"""A rough per-device memory estimate of a training config, before anything is built.

:func:`estimate` counts, for one process:

- parameters, gradients and AdamW's two moments in float32, 16 bytes per
  parameter, sharded over ``dp_shard x cp x tp x pp`` (FSDP shards over the
  data-parallel and context-parallel ranks, TP and PP split the layers);
- activations kept for the backward pass, per transformer layer after
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"): ``34 s b h`` bytes at 2 bytes per value, plus
  ``5 a s^2 b`` for attention scores where they are materialized (on CPU,
  where SDPA runs its math kernel; flash/flex/varlen kernels on a GPU do not
  keep them); divided by ``tp``, with ``s`` the sequence per ``cp`` rank and
  the layers per ``pp`` stage. Activation checkpointing keeps only each
  checkpointed layer's input (``full``: every layer; ``selective`` with an
  integer ``k``: every k-th layer; ``selective`` ``op``: about a quarter of a
  layer) plus one layer being recomputed;
- the logits and their gradient in float32 (``b s V``, three copies).

Values are 4 bytes on CPU (autocast to bfloat16 is off there) and 2 on a GPU
(torchtitan's mixed precision). It is an estimate (allocator slack, comms
buffers and the optimizer's temporaries are not counted), meant to catch a
config that is several times too big, not to tune one that is close.

The device's memory is the GPU's, or on a CPU host the RAM (or the cgroup
limit) divided over the processes of this node.

:func:`launch_notes` says the other things a launch changes without asking:
more CPU processes than cores, and a global batch that grew with the
data-parallel degree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    """Parameters of the model (all of them)."""
    states_bytes: float
    """Parameters + gradients + AdamW moments on one device."""
    activations_bytes: float
    logits_bytes: float
    device_bytes: float | None
    device: str

    @property
    def total_bytes(self) -> float:
        return self.states_bytes + self.activations_bytes + self.logits_bytes

    def line(self) -> str:
        have = f" of {self.device_bytes / GiB:.1f} GiB ({self.device})" if self.device_bytes else ""
        return (f"memory estimate per process: {self.total_bytes / GiB:.1f} GiB{have} = "
                f"parameters+gradients+optimizer {self.states_bytes / GiB:.2f} GiB "
                f"({self.params:,} parameters) + activations {self.activations_bytes / GiB:.2f} GiB "
                f"+ logits {self.logits_bytes / GiB:.2f} GiB")


def _count_params(model_cls: Any, args: Any) -> int:
    import torch

    with torch.device("meta"):
        model = model_cls(args)
    return sum(p.numel() for p in model.parameters())


def _host_memory(local_processes: int) -> float | None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
            if text.isdigit():
                total = min(total, int(text))
        except OSError:
            pass
    return total / max(local_processes, 1)


def _ac_layers(ac: Any, n_layers: int) -> tuple[float, float]:
    """(layers keeping all their activations, layers keeping only their input)."""
    mode = getattr(ac, "mode", "none")
    if mode == "full":
        return 1.0, n_layers  # one layer recomputed at a time
    if mode == "selective":
        option = str(getattr(ac, "selective_ac_option", "op"))
        if option.isdigit() and int(option) > 0:
            every = int(option)
            checkpointed = n_layers // every
            return n_layers - checkpointed + (1 if checkpointed else 0), checkpointed
        return 0.25 * n_layers + 1, 0.0  # op-level: matmul outputs kept, the rest recomputed
    return float(n_layers), 0.0


def estimate(cfg: Any, world_size: int, local_world_size: int, cuda: bool) -> MemoryEstimate | None:
    """Per-process memory of training ``cfg`` (None when the model is not a
    registered transformer this can count)."""
    from torchtitan.protocols.train_spec import get_train_spec

    try:
        spec = get_train_spec(cfg.model.name)
        args = spec.model_args[cfg.model.flavor]
    except (ValueError, KeyError, ModuleNotFoundError):
        return None
    dim, layers, heads = (getattr(args, k, None) for k in ("dim", "n_layers", "n_heads"))
    vocab = getattr(args, "vocab_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (dim, layers, heads, vocab)):
        return None
    t, p = cfg.training, cfg.parallelism
    tp, pp, cp = p.tensor_parallel_degree, p.pipeline_parallel_degree, p.context_parallel_degree
    shard = p.data_parallel_shard_degree
    if shard == -1:
        shard = max(world_size // max(tp * pp * cp * p.data_parallel_replicate_degree, 1), 1)

    params = _count_params(spec.model_cls, args)
    states = 16.0 * params / max(shard * cp * tp * pp, 1)

    value = 2 if cuda else 4
    batch, seq = t.local_batch_size, t.seq_len // max(cp, 1)
    tokens = batch * seq
    full_layer = value / 2 * 34 * tokens * dim / tp
    if not cuda:
        full_layer += value / 2 * 5 * heads * seq * seq * batch / tp
    stage_layers = -(-layers // max(pp, 1))
    kept_full, kept_input = _ac_layers(cfg.activation_checkpoint, stage_layers)
    activations = kept_full * full_layer + kept_input * tokens * dim * value
    logits = 3 * 4.0 * tokens * vocab / tp

    if cuda:
        import torch

        device_bytes = float(torch.cuda.get_device_properties(0).total_memory)
        device = torch.cuda.get_device_name(0)
    else:
        device_bytes = _host_memory(local_world_size)
        device = f"host RAM / {local_world_size} process(es)" if local_world_size > 1 else "host RAM"
    return MemoryEstimate(params, states, activations, logits, device_bytes, device)


def launch_notes(cfg: Any, world_size: int, local_world_size: int, cuda: bool) -> list[str]:
    """Lines (``warning: ...``/``note: ...``) about the launch, not errors: more
    processes than CPU cores on a CPU host, and the global batch when torchtitan
    derives it (``global_batch_size = -1``) from several data-parallel ranks."""
    notes = []
    if not cuda:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if local_world_size > cores:
            notes.append(f"warning: {local_world_size} processes on {cores} CPU core(s): they share the cores "
                         f"(about {cores / local_world_size:.2g} core each: slow, and gloo collectives may "
                         f"time out); use NPROC <= {cores}")
    t, p = cfg.training, cfg.parallelism
    others = p.tensor_parallel_degree * p.pipeline_parallel_degree * p.context_parallel_degree
    dp = world_size // max(others, 1)
    if dp > 1 and not (isinstance(t.global_batch_size, int) and t.global_batch_size > 0):
        notes.append(f"note: global batch {t.local_batch_size * dp} rows = local_batch_size "
                     f"{t.local_batch_size} x {dp} data-parallel ranks ({t.local_batch_size * dp * t.seq_len:,} "
                     f"tokens per step); set [training] global_batch_size to keep it when the process count changes")
    return notes
