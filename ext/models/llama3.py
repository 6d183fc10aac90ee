"""The Llama-3 family as our train spec ``ext_llama3``.

Model code, optimizers, pipelining and the state-dict adapter are
torchtitan's own; the spec adds the tiny CPU flavors, the parallelize fixes
of :mod:`ext.parallel` and the run summary of :mod:`ext.metrics`.
"""

from __future__ import annotations

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.components.validate import build_validator
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.llama3 import Transformer, TransformerModelArgs, llama3_args
from torchtitan.models.llama3.infra.parallelize import parallelize_llama
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.train_spec import TrainSpec

from ext.data.loader import build_packed_dataloader
from ext.metrics import build_summary_metrics_processor
from ext.models.segments import SegmentMasking, convert_args, with_segment_args
from ext.parallel import with_extension_fixes
from ext.scheduler import build_lr_schedulers

LLAMA3_SPEC_NAME = "ext_llama3"

SegmentLlama3Args = with_segment_args(TransformerModelArgs)


class SegmentLlama3(SegmentMasking, Transformer):
    """torchtitan's Llama-3 with attention masked by the batch's segment ids."""

    def __init__(self, model_args: SegmentLlama3Args):
        super().__init__(model_args)
        self.install_segment_attention()

    def forward(self, tokens, attention_masks=None, positions=None, segment_ids=None):
        if self.model_args.mask_backend == "dense":
            self.set_dense_mask(segment_ids)
        return super().forward(tokens, attention_masks=attention_masks, positions=positions)

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
}


def llama3_flavors() -> dict[str, TransformerModelArgs]:
    """torchtitan's llama3 flavors (debugmodel, 8B, 70B, 405B, ...) plus ours."""
    return {
        name: convert_args(args, SegmentLlama3Args)
        for name, args in {**llama3_args, **TINY_FLAVORS}.items()
    }


def llama3_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=SegmentLlama3,
        model_args=llama3_flavors(),
        parallelize_fn=with_extension_fixes(parallelize_llama),
        pipelining_fn=pipeline_llm,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_packed_dataloader,
        build_tokenizer_fn=build_hf_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_summary_metrics_processor,
        state_dict_adapter=Llama3StateDictAdapter,
    )
