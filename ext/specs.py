"""Our train specs, ``ext_llama3`` and ``ext_qwen3``, composed and registered.

A model module (:mod:`ext.model.llama3`, :mod:`ext.model.qwen3`) brings the
model side: class, flavors, parallelize and pipelining functions, optimizer
builder and HF adapter. :func:`ext_train_spec` adds the extension's builders
(the packed loader, LR schedulers, HF tokenizer, loss, validator and
metrics) and wraps the parallelize function with the tied-weight FSDP
grouping and the DDP/CPU fixes. :func:`register_all` is one step of
:func:`ext.plugin.install`.
"""

from __future__ import annotations

from typing import Any, Callable

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.protocols.train_spec import TrainSpec, _extra_train_specs, register_train_spec

from ext.core.parallel import with_extension_fixes
from ext.data.loader import build_packed_dataloader
from ext.model.llama3 import LLAMA3_SPEC_NAME, llama3_parts
from ext.model.qwen3 import QWEN3_SPEC_NAME, qwen3_parts
from ext.model.tying import with_tied_fsdp
from ext.training.eval import build_ext_validator
from ext.training.metrics import build_summary_metrics_processor
from ext.training.scheduler import build_lr_schedulers


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


SPECS: dict[str, Callable[[], dict[str, Any]]] = {
    LLAMA3_SPEC_NAME: llama3_parts,
    QWEN3_SPEC_NAME: qwen3_parts,
}


def register_all() -> None:
    """Register every spec of this package once (safe to call repeatedly)."""
    for name, parts in SPECS.items():
        if name not in _extra_train_specs:
            register_train_spec(name, ext_train_spec(**parts()))
