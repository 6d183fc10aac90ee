"""The dense attention mask is per-step state passed down the forward call:
built from the batch's segment ids, handed to every layer as its
``attention_masks`` argument, kept by autograd and activation checkpointing
for the backward, and held by no module afterwards."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torchtitan.config.job_config import ActivationCheckpoint
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list
from torchtitan.protocols.train_spec import get_train_spec

import ext.job_config  # noqa: F401
from ext.data.skyladder import fragment_segments
from ext.model.masks import dense_mask

torch.set_default_dtype(torch.float32)

SPECS = [("ext_llama3", "nano"), ("ext_qwen3", "tiny")]
BATCH, SEQ = 2, 64
AC = {
    "no-ac": None,
    "full-ac": ActivationCheckpoint(mode="full"),
    "op-sac": ActivationCheckpoint(mode="selective", selective_ac_option="op"),
}


def segment_ids_of(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def model_of(spec: str, flavor: str, backend: str) -> torch.nn.Module:
    args = dataclasses.replace(copy.deepcopy(get_train_spec(spec).model_args[flavor]),
                               mask_backend=backend, max_seq_len=SEQ, n_layers=2)
    torch.manual_seed(0)
    model = get_train_spec(spec).model_cls(args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model.train()


def dense_model(spec: str, flavor: str, ac: str) -> torch.nn.Module:
    model = model_of(spec, flavor, "dense")
    if AC[ac] is not None:
        apply_ac(model, AC[ac], op_sac_save_list=_op_sac_save_list)
    return model


class ExplicitMaskSDPA(torch.nn.Module):
    """The reference: SDPA with the batch's explicit boolean mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.reference_mask = mask

    def forward(self, q, k, v, *, scale=None, enable_gqa=False, is_causal=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.reference_mask, scale=scale,
                                              enable_gqa=enable_gqa)


def reference(spec: str, flavor: str, weights: dict):
    """torchtitan's plain model with ``weights``, and ``use(seg)``, which gives
    its layers torchtitan's causal SDPA (``seg`` None) or SDPA with ``dense_mask(seg)``."""
    model = model_of(spec, flavor, "none")
    model.load_state_dict(weights)
    causal = [layer.attention.inner_attention for layer in model.layers.values()]

    def use(seg: torch.Tensor | None) -> None:
        for layer, inner in zip(model.layers.values(), causal):
            layer.attention.inner_attention = inner if seg is None else ExplicitMaskSDPA(dense_mask(seg))

    return model, use


def batches() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(tokens, labels, segment ids) of three batches of the same shape."""
    g = torch.Generator().manual_seed(0)
    docs = segment_ids_of([7, 19, 1, 25, 12])
    skyladder = torch.from_numpy(fragment_segments(segment_ids_of([30, 21, 13]).numpy(), 16))
    out = {}
    for name, seg in (("documents", torch.stack([docs, segment_ids_of([40, 24])])),
                      ("no-segment-ids", None),
                      ("skyladder", torch.stack([skyladder, docs]))):
        tokens, labels = (torch.randint(0, 2048, (BATCH, SEQ), generator=g) for _ in range(2))
        out[name] = tokens, labels, seg
    return out


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, atol=1e-6, rtol=1e-5), name


# Every checkpointing mode on Llama-3; Qwen3 (the same mixin on its own attention
# class) under full checkpointing, the case the old design got wrong. Kept small
# for the suite's time budget.
CASES = [(*SPECS[0], ac) for ac in AC] + [(*SPECS[1], "full-ac")]


@pytest.mark.parametrize("spec,flavor,ac", CASES, ids=[f"{s}-{ac}" for s, _, ac in CASES])
def test_dense_logits_and_gradients_equal_the_explicit_mask_reference(spec, flavor, ac):
    """Each batch alone (forward, backward), then all three forwards before one
    backward: recomputation under activation checkpointing must see each
    batch's own mask, not the last one built."""
    model = dense_model(spec, flavor, ac)
    ref, use = reference(spec, flavor, model_of(spec, flavor, "dense").state_dict())
    wanted = {}
    for name, (tokens, labels, seg) in batches().items():
        use(seg)
        ref.zero_grad()
        logits = ref(tokens)
        loss_of(logits, labels).backward()
        wanted[name] = logits.detach(), grads_of(ref)

    for name, (tokens, labels, seg) in batches().items():
        model.zero_grad()
        logits = model(tokens, segment_ids=seg)
        assert torch.equal(logits, wanted[name][0]), name  # the same SDPA calls, bit for bit
        loss_of(logits, labels).backward()
        got = grads_of(model)
        assert got.keys() == wanted[name][1].keys()
        assert all(torch.equal(got[n], g) for n, g in wanted[name][1].items()), name

    model.zero_grad()
    losses = [loss_of(model(tokens, segment_ids=seg), labels) for tokens, labels, seg in batches().values()]
    sum(losses).backward()
    assert_close_grads(grads_of(model), {n: sum(w[1][n] for w in wanted.values()) for n in wanted["documents"][1]})


@pytest.mark.parametrize("spec,flavor", SPECS, ids=[s for s, _ in SPECS])
def test_a_mask_passed_as_attention_masks_is_the_one_built_from_segment_ids(spec, flavor):
    model = dense_model(spec, flavor, "no-ac")
    tokens, _, seg = batches()["skyladder"]
    masks = model.get_attention_masks({"input": tokens}, None, {"segment_ids": seg})
    assert torch.equal(masks, dense_mask(seg))
    with torch.no_grad():
        assert torch.equal(model(tokens, attention_masks=masks), model(tokens, segment_ids=seg))


def tensors_held(model: torch.nn.Module, shape: torch.Size) -> list[str]:
    """Attributes of the model's modules that hold a tensor of ``shape`` or a
    non-None value under a name containing "mask"."""
    held = []
    for module_name, module in model.named_modules():
        entries = dict(vars(module))
        for store in ("_parameters", "_buffers"):
            entries.update(entries.pop(store, {}))
        for attr, value in entries.items():
            if isinstance(value, torch.Tensor) and value.shape == shape:
                held.append(f"{module_name}.{attr}")
            elif "mask" in attr.lower() and value is not None and not callable(value):
                held.append(f"{module_name}.{attr}")
    return held


HELD_CASES = [(*SPECS[0], "no-ac"), (*SPECS[0], "full-ac"), (*SPECS[1], "full-ac")]


@pytest.mark.parametrize("spec,flavor,ac", HELD_CASES, ids=[f"{s}-{ac}" for s, _, ac in HELD_CASES])
def test_no_module_holds_the_dense_mask_after_a_step(spec, flavor, ac):
    model = dense_model(spec, flavor, ac)
    tokens, labels, seg = batches()["documents"]
    attentions = [m for m in model.modules() if hasattr(m, "inner_attention")]
    seen: list[tuple[int, weakref.ref] | None] = []  # (id, weakref) of each call's attention_masks

    def record(module, args, kwargs):
        mask = args[2] if len(args) > 2 else kwargs.get("attention_masks")
        seen.append(None if mask is None else (id(mask), weakref.ref(mask)))

    hooks = [a.register_forward_pre_hook(record, with_kwargs=True) for a in attentions]
    loss_of(model(tokens, segment_ids=seg), labels).backward()
    for hook in hooks:
        hook.remove()

    shape = torch.Size([BATCH, 1, SEQ, SEQ])
    assert tensors_held(model, shape) == []
    # every layer (and every recomputation under AC) got the one mask of the batch
    assert len(seen) == len(attentions) * (2 if ac == "full-ac" else 1)
    assert None not in seen, "the layers got no attention_masks"
    assert len({ident for ident, _ in seen}) == 1
    gc.collect()
    assert seen[0][1]() is None, "the step's mask outlived the step"
