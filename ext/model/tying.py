"""Weight tying: one Parameter shared by ``tok_embeddings`` and ``output``.

Small models (Llama-3.2-1B/3B, Qwen3-0.6B..4B, SmolLM2) use the input
embedding matrix as the LM head. Everything that touches the weights has to
agree that there is one tensor:

- Model: ``output.weight`` *is* ``tok_embeddings.weight``.
  ``nn.Module.to_empty()`` gives each module its own copy of a shared meta
  tensor, so the models re-tie at the start of ``init_weights`` (torchtitan's
  Qwen3 does this too; under FSDP the two names already point at one sharded
  Parameter, see below). The tied matrix ends with the head's initialization
  (truncated normal, std ``dim ** -0.5``), as in torchtitan's Qwen3.
- FSDP/HSDP: torchtitan 0.2.2's ``apply_fsdp`` (Llama-3 and Qwen3 alike) puts
  ``tok_embeddings`` in one FSDP unit and ``[norm, output]`` in another, so
  the one tensor is managed twice; torch 2.13 stops at the first forward
  ("Parameter ... is shared with a parameter already managed by another
  FSDP group"), also for torchtitan's own tied Qwen3 flavors (without that
  check, FSDP would shard two separate copies). :func:`with_tied_fsdp` keeps both
  modules out of those two units, so the root unit (which also takes the
  final norm) holds the tied weight once and FSDP re-registers it under both
  names at every unshard/reshard.
- Tensor and pipeline parallelism would split the pair (TP shards the
  embedding and the head as separate DTensors, PP puts them on different
  stages): :func:`check_tied_layout` rejects them with a one-line error.
- Checkpoints: torchtitan's DCP state dict has both keys pointing at the same
  tensor, so save and load keep the tie; HF export writes
  ``model.embed_tokens.weight`` only (the state-dict adapters drop
  ``output.weight``) and HF import fills the head from the embedding.
- Counts: ``model.parameters()`` yields the shared Parameter once.
  torchtitan's ``get_*_nparams_and_flops`` subtract the embedding once more
  for tied models, so the embedding is counted zero times and the head's
  matmul FLOPs are missing; :func:`tied_nparams_and_flops` adds both back.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn as nn

from ext.core.errors import ConfigError

TIED_MODULES = ("tok_embeddings", "output")


def is_tied(model_args: Any) -> bool:
    return bool(getattr(model_args, "enable_weight_tying", False))


def tie_weights(model: nn.Module) -> None:
    """Point ``model.output.weight`` at ``model.tok_embeddings.weight`` (both present)."""
    embeddings = getattr(model, "tok_embeddings", None)
    output = getattr(model, "output", None)
    if embeddings is not None and output is not None and output.weight is not embeddings.weight:
        output.weight = embeddings.weight


def check_tied_layout(model_args: Any, job_config: Any, flavor: str) -> None:
    """Raise ConfigError when a tied flavor meets a layout that would untie it."""
    if not is_tied(model_args):
        return
    parallelism = job_config.parallelism
    for key in ("tensor_parallel_degree", "pipeline_parallel_degree"):
        degree = getattr(parallelism, key, 1)
        if degree > 1:
            raise ConfigError(
                f"[model] flavor {flavor!r} ties the embedding and the output head, which "
                f"[parallelism] {key} = {degree} would split; set {key} = 1 or use an untied flavor"
            )


@contextmanager
def _hidden_from_apply_fsdp(model: nn.Module) -> Iterator[None]:
    # torchtitan's apply_fsdp wraps `model.tok_embeddings` and `[model.norm,
    # model.output]` only when the attributes are not None. An instance
    # attribute shadows nn.Module's submodule lookup, so the checks read None
    # while the modules stay registered and fall to the root unit.
    for name in TIED_MODULES:
        model.__dict__[name] = None
    try:
        yield
    finally:
        for name in TIED_MODULES:
            model.__dict__.pop(name, None)


def with_tied_fsdp(
    parallelize_fn: Callable[[nn.Module, Any, Any], nn.Module],
) -> Callable[[nn.Module, Any, Any], nn.Module]:
    """``parallelize_fn`` that keeps a tied embedding/head in one FSDP unit.

    Untied models, and tied models without FSDP, go through unchanged.
    """

    def parallelize(model: nn.Module, parallel_dims: Any, job_config: Any) -> nn.Module:
        if not (is_tied(model.model_args) and parallel_dims.fsdp_enabled):
            return parallelize_fn(model, parallel_dims, job_config)
        with _hidden_from_apply_fsdp(model):
            model = parallelize_fn(model, parallel_dims, job_config)
        if model.output.weight is not model.tok_embeddings.weight:
            raise RuntimeError("FSDP wrapping untied the embedding and the output head")
        return model

    parallelize.__name__ = getattr(parallelize_fn, "__name__", "parallelize")
    parallelize.__doc__ = parallelize_fn.__doc__
    return parallelize


def tied_nparams_and_flops(
    model_args: Any, model: nn.Module, nparams: int, flops_per_token: int
) -> tuple[int, int]:
    """Correct torchtitan's (nparams, flops/token) for a tied model.

    torchtitan subtracts the embedding from a count that already holds the
    shared matrix once, and leaves the head out of the matmul FLOPs. Returns
    the count with the shared matrix once and the FLOPs with the head's
    ``6 * vocab * dim`` (forward and backward) per token.
    """
    if not is_tied(model_args) or getattr(model, "tok_embeddings", None) is None:
        return nparams, flops_per_token
    shared = model.tok_embeddings.weight.numel()
    return nparams + shared, flops_per_token + 6 * shared


class TiedArgs:
    """Mixin for model-args dataclasses: tied layouts are checked against the
    config, and the parameter/FLOP counts are corrected for a tied head."""

    def update_from_config(self, job_config: Any, **kwargs: Any) -> None:
        super().update_from_config(job_config, **kwargs)  # type: ignore[misc]
        check_tied_layout(self, job_config, job_config.model.flavor)

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        counts = super().get_nparams_and_flops(model, seq_len)  # type: ignore[misc]
        return tied_nparams_and_flops(self, model, *counts)
