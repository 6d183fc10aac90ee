"""The parts every train spec of this package shares.

A spec brings its model (class, flavors, parallelize and pipelining
functions, optimizer builder, HF adapter); :func:`ext_train_spec` adds the
extension's builders: the packed loader, LR schedulers, HF tokenizer, loss,
validator and metrics, and wraps the parallelize function with the
tied-weight FSDP grouping and the DDP/CPU fixes.
"""

from __future__ import annotations

from typing import Any, Callable

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.protocols.train_spec import TrainSpec

from ext.data.loader import build_packed_dataloader
from ext.eval import build_ext_validator
from ext.metrics import build_summary_metrics_processor
from ext.models.tying import with_tied_fsdp
from ext.parallel import with_extension_fixes
from ext.scheduler import build_lr_schedulers


def ext_train_spec(
    *,
    model_cls: type,
    model_args: dict[str, Any],
    parallelize_fn: Callable,
    pipelining_fn: Callable | None,
    build_optimizers_fn: Callable,
    state_dict_adapter: type | None,
) -> TrainSpec:
    return TrainSpec(
        model_cls=model_cls,
        model_args=model_args,
        parallelize_fn=with_extension_fixes(with_tied_fsdp(parallelize_fn)),
        pipelining_fn=pipelining_fn,
        build_optimizers_fn=build_optimizers_fn,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_packed_dataloader,
        build_tokenizer_fn=build_hf_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_ext_validator,
        build_metrics_processor_fn=build_summary_metrics_processor,
        state_dict_adapter=state_dict_adapter,
    )
