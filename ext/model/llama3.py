"""The Llama-3 family as our train spec ``ext_llama3``.

Model code, optimizers, pipelining and the state-dict adapter are
torchtitan's own; the spec adds the tiny CPU flavors, the parallelize fixes
of :mod:`ext.core.parallel` and the run summary of :mod:`ext.training.metrics`.

Weight tying (``enable_weight_tying``, which torchtitan's Llama-3 lacks) is
added here: one Parameter for ``tok_embeddings`` and ``output``, kept in one
FSDP unit, written once to HF checkpoints (see :mod:`ext.model.tying`).
Real-size flavors besides torchtitan's (``8B``, ``70B``, ``405B``: Llama-3.1,
July 2024): ``3.2-1B`` and ``3.2-3B`` (Llama-3.2, September 2024; tied,
RoPE scaling factor 32), ``3.1-8B`` (= torchtitan's ``8B``) and the
SmolLM2 shapes ``smollm2-135M`` and ``smollm2-360M`` (November 2024; tied,
no RoPE scaling, context 8192); ``tests/test_models.py`` pins them against
the HF configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchtitan.components.optimizer import build_optimizers
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.llama3 import Transformer, TransformerModelArgs, llama3_args
from torchtitan.models.llama3.infra.parallelize import parallelize_llama
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.models.llama3.model.model import Attention

from ext.model.hf import Llama3HFAdapter
from ext.model.segments import DenseMaskAttention, SegmentMasking, convert_args, with_segment_args
from ext.model.tying import TiedArgs, tie_weights

LLAMA3_SPEC_NAME = "ext_llama3"



@dataclass
class Llama3Args(TiedArgs, TransformerModelArgs):
    """torchtitan's Llama-3 args plus weight tying."""

    enable_weight_tying: bool = False
    """One matrix for the token embedding and the output head (counted once)."""

    context_length: int = 0
    """
    Context of the released model this flavor reproduces: the
    ``max_position_embeddings`` of an HF export (at least the trained
    ``max_seq_len``). 0: ``max_seq_len``. Training does not change it.
    """


SegmentLlama3Args = with_segment_args(Llama3Args)


class DenseMaskLlama3Attention(DenseMaskAttention, Attention):
    """torchtitan's Llama-3 attention taking a boolean ``attention_masks`` (dense backend)."""


class SegmentLlama3(SegmentMasking, Transformer):
    """torchtitan's Llama-3 with attention masked by the batch's segment ids."""

    dense_attention = DenseMaskLlama3Attention

    def __init__(self, model_args: SegmentLlama3Args):
        super().__init__(model_args)
        self.install_segment_attention()
        if model_args.enable_weight_tying:
            tie_weights(self)

    def init_weights(self, buffer_device=None):
        if self.model_args.enable_weight_tying:
            tie_weights(self)  # to_empty() gave each module its own copy
        super().init_weights(buffer_device=buffer_device)


# Tiny flavors sized for the shipped 2048-token tokenizer and a 2-core CPU.
TINY_FLAVORS: dict[str, TransformerModelArgs] = {
    # ~1.3M parameters: the debug config's model, trains in about a minute on CPU.
    "tiny": TransformerModelArgs(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048,
        multiple_of=64, rope_theta=10000,
    ),
    # ~0.3M parameters: for tests that start many short runs.
    "nano": TransformerModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048,
        multiple_of=32, rope_theta=10000,
    ),
    # "tiny" with the head tied to the embedding (~1.0M parameters).
    "tiny_tied": Llama3Args(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048,
        multiple_of=64, rope_theta=10000, enable_weight_tying=True,
    ),
}

# The released shapes (HF config.json of each model; checked in tests/test_models.py).
_LLAMA32_ROPE = RoPEScalingArgs(scaling_factor=32.0)  # Llama-3.2: factor 32, else as 3.1
_NO_ROPE_SCALING = RoPEScalingArgs(scaling_factor=1.0)  # factor 1: plain RoPE (SmolLM2)
REAL_FLAVORS: dict[str, Llama3Args] = {
    "3.2-1B": Llama3Args(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
        ffn_dim_multiplier=1.5, rope_theta=500000, rope_scaling_args=_LLAMA32_ROPE,
        enable_weight_tying=True,
    ),
    "3.2-3B": Llama3Args(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
        ffn_dim_multiplier=1.0, rope_theta=500000, rope_scaling_args=_LLAMA32_ROPE,
        enable_weight_tying=True,
    ),
    "3.1-8B": Llama3Args(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.3, rope_theta=500000,
    ),
    # SmolLM2 is the Llama architecture: ~135M and ~360M, tied, 8k context.
    "smollm2-135M": Llama3Args(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
        rope_theta=100000, rope_scaling_args=_NO_ROPE_SCALING, max_seq_len=8192,
        enable_weight_tying=True,
    ),
    "smollm2-360M": Llama3Args(
        dim=960, n_layers=32, n_heads=15, n_kv_heads=5, vocab_size=49152, multiple_of=256,
        rope_theta=100000, rope_scaling_args=_NO_ROPE_SCALING, max_seq_len=8192,
        enable_weight_tying=True,
    ),
}


def llama3_flavors() -> dict[str, TransformerModelArgs]:
    """torchtitan's llama3 flavors (debugmodel, 8B, 70B, 405B, ...) plus ours, each
    with ``context_length`` = its ``max_seq_len`` as defined (131072 for Llama-3.1,
    3.2 and torchtitan's default, 8192 for SmolLM2)."""
    flavors = {}
    for name, args in {**llama3_args, **REAL_FLAVORS, **TINY_FLAVORS}.items():
        flavor = convert_args(args, SegmentLlama3Args)
        flavor.context_length = args.max_seq_len
        flavors[name] = flavor
    return flavors


def llama3_parts() -> dict[str, Any]:
    """The model side of the ``ext_llama3`` train spec (:mod:`ext.specs` adds the rest)."""
    return dict(
        model_cls=SegmentLlama3,
        model_args=llama3_flavors(),
        parallelize_fn=parallelize_llama,
        pipelining_fn=pipeline_llm,
        build_optimizers_fn=build_optimizers,
        state_dict_adapter=Llama3HFAdapter,
    )
