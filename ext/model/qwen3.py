"""The Qwen3 family (dense and MoE) as our train spec ``ext_qwen3``.

Model code, parallelisms and the state-dict adapter are torchtitan's
(``torchtitan.models.qwen3``); the spec adds what ``ext_llama3`` has
(segment-aware attention, the packed loader, our LR schedules, the run
summary, the DDP/gloo fixes) plus:

- weight tying that survives FSDP (:mod:`ext.model.tying`);
- the ``[moe]`` section and fp32 grouped experts on CPU (:mod:`ext.model.moe`);
- MoE load balancing as Qwen3-MoE trains it, an auxiliary loss
  (``[moe] aux_loss_coeff``, 1e-3 as the released configs'
  ``router_aux_loss_coef``), which an HF export keeps; the bias balancing of
  torchtitan (``[moe] load_balance_coeff``) is off by default and, when
  chosen, actually runs: torchtitan's own Qwen3 spec builds plain
  optimizers, so its ``expert_bias`` never moves; we use
  ``build_optimizers_with_moe_load_balancing``.

Flavors: torchtitan's (``0.6B``, ``1.7B``, ``4B``, ``8B``, ``14B``, ``32B``,
``30B-A3B``, ``235B-A22B``, ``debugmodel``, ``debugmodel_moe``), whose
shapes are those of the released checkpoints of the original (April 2025)
Qwen3 release (``tests/test_models.py`` pins them against those HF
configs): ``max_seq_len`` and ``context_length`` 40960 and ``rope_theta``
1e6 for every one (torchtitan's ``235B-A22B`` says 5e6 and 4096, and its
``30B-A3B`` 262144: values of the later 2507 releases or none). Training sets
``max_seq_len`` to ``training.seq_len``; ``context_length`` is what an HF
export declares. Plus tiny CPU flavors on the shipped 2048-token tokenizer
(context 4096).
"""

import copy
from dataclasses import dataclass, replace
from typing import Any

from torchtitan.components.optimizer import build_optimizers_with_moe_load_balancing
from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3 import Qwen3Model, Qwen3ModelArgs, qwen3_args
from torchtitan.models.qwen3.infra.parallelize import parallelize_qwen3
from torchtitan.models.qwen3.model.model import Attention
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

from ext.model.moe import QWEN3_AUX_LOSS_COEFF, balanced_moe_args, install_routed_moe, moe_args_from_config
from ext.model.segments import DenseMaskAttention, SegmentMasking, convert_args, with_segment_args
from ext.model.tying import TiedArgs

QWEN3_SPEC_NAME = "ext_qwen3"


@dataclass
class Qwen3Args(TiedArgs, Qwen3ModelArgs):
    """torchtitan's Qwen3 args; the config also sets ``[moe]`` and checks tying."""

    context_length: int = 0
    """
    Context of the released model this flavor reproduces: the
    ``max_position_embeddings`` of an HF export (at least the trained
    ``max_seq_len``). 0: ``max_seq_len``. Training does not change it.
    """

    def update_from_config(self, job_config: Any, **kwargs: Any) -> None:
        super().update_from_config(job_config, **kwargs)
        if self.moe_enabled:
            self.moe_args = moe_args_from_config(self.moe_args, job_config)


SegmentQwen3Args = with_segment_args(Qwen3Args)


class DenseMaskQwen3Attention(DenseMaskAttention, Attention):
    """torchtitan's Qwen3 attention taking a boolean ``attention_masks`` (dense backend)."""


class SegmentQwen3(SegmentMasking, Qwen3Model):
    """torchtitan's Qwen3 with segment-masked attention and :class:`ext.model.moe.RoutedMoE`."""

    dense_attention = DenseMaskQwen3Attention

    def __init__(self, model_args: SegmentQwen3Args):
        super().__init__(model_args)
        install_routed_moe(self)
        self.install_segment_attention()


def _tiny_moe(top_k: int = 2, num_experts: int = 8) -> MoEArgs:
    # Qwen3-MoE routing: softmax scores, top-k renormalized, no shared expert.
    return MoEArgs(
        num_experts=num_experts, num_shared_experts=0, top_k=top_k, score_func="softmax",
        route_norm=True, route_scale=1.0, score_before_experts=False,
    )


_TINY = dict(
    vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
    hidden_dim=384, rope_theta=1000000, max_seq_len=4096, qk_norm=True,
)

# Tiny flavors for the shipped 2048-token tokenizer and a 2-core CPU.
TINY_FLAVORS: dict[str, Qwen3ModelArgs] = {
    # ~1.05M parameters, tied like the small Qwen3 models.
    "tiny": Qwen3ModelArgs(**_TINY, enable_weight_tying=True),
    # ~1.3M parameters, separate head.
    "tiny_untied": Qwen3ModelArgs(**_TINY),
    # 8 experts of width 64, 2 per token, routed as Qwen3-MoE (~1.5M parameters, ~0.9M
    # active per token; ~1.25M when tied).
    "tiny_moe": Qwen3ModelArgs(**_TINY, moe_enabled=True, moe_inter_dim=64, moe_args=_tiny_moe()),
    "tiny_moe_tied": Qwen3ModelArgs(
        **_TINY, moe_enabled=True, moe_inter_dim=64, moe_args=_tiny_moe(), enable_weight_tying=True
    ),
}

# The original (April 2025) Qwen3 releases: max_position_embeddings 40960 and
# rope_theta 1e6 for every size (torchtitan's flavors say max_seq_len 4096, and
# 262144 for 30B-A3B; its 235B-A22B has rope_theta 5e6, from the 2507 release).
ORIGINAL_RELEASE = {
    name: dict(max_seq_len=40960, rope_theta=1000000)
    for name in ("0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B", "235B-A22B")
}


def qwen3_flavors() -> dict[str, SegmentQwen3Args]:
    """torchtitan's qwen3 flavors (real sizes as released, see
    :data:`ORIGINAL_RELEASE`) plus ours, each with its own MoEArgs copy. MoE
    flavors balance with Qwen3's auxiliary loss, without routing biases."""
    flavors = {}
    for name, args in {**qwen3_args, **TINY_FLAVORS}.items():
        args = copy.deepcopy(args)
        args = replace(args, **ORIGINAL_RELEASE.get(name, {}))
        if args.moe_enabled:
            args = replace(args, moe_args=balanced_moe_args(
                args.moe_args, load_balance_coeff=None, aux_loss_coeff=QWEN3_AUX_LOSS_COEFF))
        flavor = convert_args(args, SegmentQwen3Args)
        flavor.context_length = args.max_seq_len
        flavors[name] = flavor
    return flavors


def qwen3_parts() -> dict[str, Any]:
    """The model side of the ``ext_qwen3`` train spec (:mod:`ext.specs` adds the rest)."""
    return dict(
        model_cls=SegmentQwen3,
        model_args=qwen3_flavors(),
        parallelize_fn=parallelize_qwen3,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers_with_moe_load_balancing,
        state_dict_adapter=Qwen3StateDictAdapter,
    )
