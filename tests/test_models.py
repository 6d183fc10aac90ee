"""Model specs: real-size flavors against the HF originals, weight tying (also
under 2-process FSDP), MoE grouped vs loop experts, and HF state-dict adapters
against real ``transformers`` models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torchtitan.config import ConfigManager
from torchtitan.protocols.train_spec import get_train_spec
from transformers import AutoModelForCausalLM

import ext.job_config  # noqa: F401
from ext.core.errors import ConfigError
from ext.model.hf import hf_config_for, load_hf_weights, read_safetensors, state_dict_adapter_for
from ext.model.moe import Experts, _IntegerHistcAsBincount

from .conftest import REPO, run_train

MOE_CONFIG = REPO / "train_configs" / "debug_qwen3_moe.toml"

# config.json of the released checkpoints (values typed in; nothing is downloaded),
# and their parameter counts with a tied matrix counted once. Releases: Llama-3.1
# (July 2024: 8B, 70B, 405B), Llama-3.2 (September 2024), SmolLM2 (November 2024),
# Qwen3 as first released (April 2025; rope_theta 1e6, context 40960 for every size;
# the 2507 updates of 4B, 30B-A3B and 235B-A22B differ: rope_theta 5e6/1e7, 262144).
ORIGINALS = {
    ("ext_llama3", "3.2-1B"): dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope=(500000.0, 32.0), max_position_embeddings=131072, params=1_235_814_400),
    ("ext_llama3", "3.2-3B"): dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope=(500000.0, 32.0), max_position_embeddings=131072, params=3_212_749_824),
    ("ext_llama3", "3.1-8B"): dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope=(500000.0, 8.0), max_position_embeddings=131072, params=8_030_261_248),
    ("ext_llama3", "70B"): dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope=(500000.0, 8.0), max_position_embeddings=131072, params=70_553_706_496),
    ("ext_llama3", "405B"): dict(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope=(500000.0, 8.0), max_position_embeddings=131072, params=405_853_388_800),
    ("ext_llama3", "smollm2-135M"): dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope=(100000.0, None), max_position_embeddings=8192, params=134_515_008),
    ("ext_llama3", "smollm2-360M"): dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope=(100000.0, None), max_position_embeddings=8192, params=361_821_120),
    ("ext_qwen3", "0.6B"): dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope=(1000000.0, None), max_position_embeddings=40960, params=596_049_920),
    ("ext_qwen3", "1.7B"): dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope=(1000000.0, None), max_position_embeddings=40960, params=1_720_574_976),
    ("ext_qwen3", "4B"): dict(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope=(1000000.0, None), max_position_embeddings=40960, params=4_022_468_096),
    ("ext_qwen3", "8B"): dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope=(1000000.0, None), max_position_embeddings=40960, params=8_190_735_360),
    ("ext_qwen3", "14B"): dict(
        hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope=(1000000.0, None), max_position_embeddings=40960, params=14_768_307_200),
    ("ext_qwen3", "32B"): dict(
        hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope=(1000000.0, None), max_position_embeddings=40960, params=32_762_123_264),
    ("ext_qwen3", "235B-A22B"): dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        rms_norm_eps=1e-6, moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, rope=(1000000.0, None), max_position_embeddings=40960,
        params=235_093_634_560),
    ("ext_qwen3", "30B-A3B"): dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, vocab_size=151936, tie_word_embeddings=False, rms_norm_eps=1e-6,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        rope=(1000000.0, None), max_position_embeddings=40960, params=30_532_122_624),
}

TINY = [
    ("ext_llama3", "tiny"), ("ext_llama3", "tiny_tied"),
    ("ext_qwen3", "tiny_untied"), ("ext_qwen3", "tiny"),
    ("ext_qwen3", "tiny_moe"), ("ext_qwen3", "tiny_moe_tied"),
]
TIED = [("ext_llama3", "tiny_tied"), ("ext_qwen3", "tiny"), ("ext_qwen3", "tiny_moe_tied")]


def flavor_args(spec: str, flavor: str, **changes):
    return dataclasses.replace(copy.deepcopy(get_train_spec(spec).model_args[flavor]), **changes)


def build(spec: str, args, seed: int = 0):
    torch.manual_seed(seed)
    model = get_train_spec(spec).model_cls(args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rope_of(config) -> tuple[float, float | None]:
    params = getattr(config, "rope_parameters", None) or {
        **(getattr(config, "rope_scaling", None) or {}), "rope_theta": config.rope_theta}
    return float(params["rope_theta"]), params.get("factor")


# -- real-size flavors ----------------------------------------------------------------

@pytest.mark.parametrize("spec,flavor", ORIGINALS, ids=[f for _, f in ORIGINALS])
def test_real_flavor_config_is_the_released_one(spec, flavor):
    config = hf_config_for(spec, flavor_args(spec, flavor))
    expected = dict(ORIGINALS[spec, flavor])
    expected.pop("params")
    assert rope_of(config) == expected.pop("rope")
    assert {k: getattr(config, k) for k in expected} == expected


def test_every_real_size_flavor_is_pinned_to_a_release():
    """A real-size flavor added later must get its released config.json values above."""
    real = {(spec, f) for spec in ("ext_llama3", "ext_qwen3") for f, a in get_train_spec(spec).model_args.items()
            if a.vocab_size > 2048}
    variants = {("ext_llama3", "8B_flex"), ("ext_llama3", "8B_varlen"), ("ext_llama3", "8B")}  # = 3.1-8B
    assert real - variants == set(ORIGINALS)
    for flavor in ("8B", "8B_flex", "8B_varlen"):
        args, ref = flavor_args("ext_llama3", flavor), flavor_args("ext_llama3", "3.1-8B")
        assert hf_config_for("ext_llama3", args).to_diff_dict() == hf_config_for("ext_llama3", ref).to_diff_dict()


# Each family's own context (HF max_position_embeddings), whatever seq_len trained it.
@pytest.mark.parametrize("spec,flavor,seq_len,context", [
    ("ext_qwen3", "0.6B", 4096, 40960),  # the shipped qwen3_0.6b_sft.toml trains at 4096
    ("ext_qwen3", "30B-A3B", 8192, 40960),
    ("ext_qwen3", "235B-A22B", 4096, 40960),
    ("ext_llama3", "smollm2-135M", 2048, 8192),
    ("ext_llama3", "3.2-1B", 2048, 131072),
    ("ext_llama3", "3.1-8B", 8192, 131072),
    ("ext_qwen3", "tiny_moe", 256, 4096),  # tiny flavors: their defined max_seq_len
    ("ext_qwen3", "0.6B", 65536, 65536),  # trained beyond the release: the trained length
])
def test_export_declares_the_family_context_not_the_training_seq_len(spec, flavor, seq_len, context):
    args = flavor_args(spec, flavor)
    args.update_from_config(parse("--model.name", spec, "--model.flavor", flavor,
                                  "--training.seq_len", str(seq_len)))
    assert args.max_seq_len == seq_len
    assert hf_config_for(spec, args).max_position_embeddings == context


def test_shipped_qwen3_sft_config_exports_the_released_context():
    cfg = ConfigManager().parse_args(["--job.config_file", str(REPO / "train_configs" / "qwen3_0.6b_sft.toml")])
    args = flavor_args(cfg.model.name, cfg.model.flavor)
    args.update_from_config(cfg)
    assert hf_config_for(cfg.model.name, args).max_position_embeddings == 40960


@pytest.mark.parametrize("spec,flavor", ORIGINALS, ids=[f for _, f in ORIGINALS])
def test_real_flavor_has_the_parameters_and_shapes_of_the_hf_model(spec, flavor):
    args = flavor_args(spec, flavor)
    with torch.device("meta"):
        ours = get_train_spec(spec).model_cls(args)
        theirs = AutoModelForCausalLM.from_config(hf_config_for(spec, args))
    assert count(ours) == count(theirs) == ORIGINALS[spec, flavor]["params"]
    assert args.get_nparams_and_flops(ours, 2048)[0] == count(ours)

    exported = state_dict_adapter_for(spec)(args, None).to_hf(ours.state_dict())
    hf = theirs.state_dict()
    expert = lambda key: ".mlp.experts." in key  # HF fuses experts in memory, one tensor each on disk
    head = {"lm_head.weight"} if args.enable_weight_tying else set()
    assert {k for k in exported if not expert(k)} == {k for k in hf if not expert(k)} - head
    assert all(exported[k].shape == hf[k].shape for k in exported if not expert(k))
    assert sum(v.numel() for k, v in exported.items() if expert(k)) == sum(
        v.numel() for k, v in hf.items() if expert(k))


# -- weight tying -----------------------------------------------------------------------

@pytest.mark.parametrize("spec,flavor", TIED)
def test_tied_flavor_has_one_parameter_after_meta_init(spec, flavor):
    with torch.device("meta"):
        model = get_train_spec(spec).model_cls(flavor_args(spec, flavor, max_seq_len=64))
    model.to_empty(device="cpu")  # gives each module its own tensor
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p is model.tok_embeddings.weight for p in model.parameters()) == 1
    assert torch.isfinite(model.output.weight).all()


@pytest.mark.parametrize("spec,tied,untied", [("ext_llama3", "tiny_tied", "tiny"), ("ext_qwen3", "tiny", "tiny_untied")])
def test_reported_count_holds_the_tied_matrix_once_and_flops_keep_the_head(spec, tied, untied):
    counts = {}
    for flavor in (tied, untied):
        args = flavor_args(spec, flavor)
        with torch.device("meta"):
            model = get_train_spec(spec).model_cls(args)
        counts[flavor] = (*args.get_nparams_and_flops(model, 256), count(model))
    (n_tied, flops_tied, distinct), (n_untied, flops_untied, _) = counts[tied], counts[untied]
    assert n_tied == distinct == n_untied - 2048 * 128
    assert flops_tied == flops_untied  # a tied head is still a matmul


def test_tied_weights_survive_a_dcp_checkpoint(tmp_path):
    args = flavor_args("ext_llama3", "tiny_tied", max_seq_len=64)
    saved, fresh = build("ext_llama3", args, seed=0), build("ext_llama3", args, seed=1)
    dcp.save(get_model_state_dict(saved), checkpoint_id=str(tmp_path))
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_model_state_dict(fresh, state)
    assert fresh.output.weight is fresh.tok_embeddings.weight
    assert torch.equal(fresh.tok_embeddings.weight, saved.tok_embeddings.weight)


def parse(*args: str):
    return ConfigManager().parse_args(["--job.custom_config_module", "ext.job_config", *args])


@pytest.mark.parametrize("spec,flavor,key", [
    ("ext_llama3", "tiny_tied", "tensor_parallel_degree"),
    ("ext_qwen3", "tiny", "pipeline_parallel_degree"),
])
def test_tied_flavor_refuses_layouts_that_split_the_pair(spec, flavor, key):
    cfg = parse("--model.name", spec, "--model.flavor", flavor, f"--parallelism.{key}", "2")
    with pytest.raises(ConfigError, match=rf"\[parallelism\] {key} = 2 .* set {key} = 1"):
        flavor_args(spec, flavor).update_from_config(cfg)
    flavor_args(spec, "tiny_untied" if spec == "ext_qwen3" else "tiny").update_from_config(cfg)


# -- MoE ----------------------------------------------------------------------------

def test_moe_section_sets_the_expert_implementation_and_rejects_unknown_ones(tmp_path):
    args = flavor_args("ext_qwen3", "tiny_moe")
    args.update_from_config(parse("--moe.implementation", "loop", "--moe.load_balance_coeff", "0"))
    assert args.moe_args.use_grouped_mm is False and args.moe_args.load_balance_coeff is None
    assert get_train_spec("ext_qwen3").model_args["tiny_moe"].moe_args.use_grouped_mm  # flavor untouched
    bad = tmp_path / "bad.toml"
    bad.write_text('[job]\ncustom_config_module = "ext.job_config"\n[moe]\nimplementation = "fused"\n')
    with pytest.raises(ConfigError, match=r"\[moe\] implementation = 'fused' .* \"grouped\" or \"loop\""):
        flavor_args("ext_qwen3", "tiny_moe").update_from_config(
            ConfigManager().parse_args(["--job.config_file", str(bad)]))


def test_qwen3_moe_balances_with_the_aux_loss_by_default_and_bias_only_when_chosen():
    args = flavor_args("ext_qwen3", "tiny_moe")
    assert (args.moe_args.aux_loss_coeff, args.moe_args.load_balance_coeff) == (1e-3, None)
    args.update_from_config(parse("--model.name", "ext_qwen3", "--model.flavor", "tiny_moe",
                                  "--training.local_batch_size", "3", "--training.seq_len", "64"))
    assert (args.moe_args.aux_loss_coeff, args.moe_args.load_balance_coeff) == (1e-3, None)
    assert args.moe_args.aux_loss_tokens_per_step == 3 * 64  # one process, no accumulation
    assert getattr(build("ext_qwen3", args).layers["0"].moe, "expert_bias") is None
    chosen = flavor_args("ext_qwen3", "tiny_moe")
    chosen.update_from_config(parse("--model.name", "ext_qwen3", "--model.flavor", "tiny_moe",
                                    "--moe.load_balance_coeff", "1e-3", "--moe.aux_loss_coeff", "0",
                                    "--training.global_batch_size", "16", "--training.local_batch_size", "4"))
    assert (chosen.moe_args.aux_loss_coeff, chosen.moe_args.load_balance_coeff) == (0.0, 1e-3)
    assert chosen.moe_args.aux_loss_tokens_per_step == 16 * 2048  # the global batch, accumulated


def test_bias_balancing_with_last_save_in_hf_is_refused_before_training_unless_drift_is_allowed():
    biased = ("--model.name", "ext_qwen3", "--model.flavor", "tiny_moe", "--moe.load_balance_coeff", "1e-3",
              "--checkpoint.enable", "--checkpoint.last_save_in_hf")
    with pytest.raises(ConfigError, match=r"^\[checkpoint\] last_save_in_hf with \[moe\] load_balance_coeff = 0.001: "
                                          r".*allow_routing_drift = true to write it anyway$"):
        flavor_args("ext_qwen3", "tiny_moe").update_from_config(parse(*biased))
    flavor_args("ext_qwen3", "tiny_moe").update_from_config(parse(*biased, "--moe.allow_routing_drift"))
    from ext.preflight import check

    problems = check(parse(*biased, "--data.datasets", str(REPO / "ext" / "assets" / "data" / "web.jsonl"),
                           "--model.hf_assets_path", str(REPO / "ext" / "assets" / "tokenizer")))
    assert [p for p in problems if "last_save_in_hf" in p] == [
        "[checkpoint] last_save_in_hf with [moe] load_balance_coeff = 0.001: the trained routing biases have "
        "no Hugging Face form, so the saved model would route differently; use [moe] aux_loss_coeff "
        "(load_balance_coeff = 0), or set [moe] allow_routing_drift = true to write it anyway"]


def test_aux_loss_gradient_equals_autograd_of_qwen3s_explicit_balancing_loss():
    """Our model backpropagates CE + coeff * (tokens / tokens_per_step) * mean over
    layers of HF's Qwen3-MoE ``load_balancing_loss_func``, written out here on the
    router logits of a model without the aux loss."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    coeff, batch, seq = 0.5, 4, 32
    args = flavor_args("ext_qwen3", "tiny_moe", n_layers=2)
    step_tokens = 3 * batch * seq  # this forward is a third of the optimizer step
    args.moe_args = dataclasses.replace(args.moe_args, aux_loss_coeff=coeff, aux_loss_tokens_per_step=step_tokens)
    ours = build("ext_qwen3", args, seed=3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("router.gate.weight"):
                p.normal_(std=0.3)  # unbalanced routing: the loss has something to push
    plain_args = dataclasses.replace(args, moe_args=dataclasses.replace(args.moe_args, aux_loss_coeff=0.0))
    plain = get_train_spec("ext_qwen3").model_cls(plain_args)
    plain.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -5:] = -100

    def token_loss(logits):
        valid = (labels != -100).sum()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / valid

    token_loss(ours(tokens)).backward()

    moe_inputs = []
    hooks = [b.moe.register_forward_pre_hook(lambda m, a: moe_inputs.append((m, a[0]))) for b in plain.layers.values()]
    ce = token_loss(plain(tokens))
    for h in hooks:
        h.remove()
    aux = torch.stack([
        load_balancing_loss_func((m.router.gate(x.reshape(-1, x.shape[-1])),), m.router.num_experts, m.router.top_k)
        for m, x in moe_inputs
    ]).mean()
    (ce + coeff * (batch * seq / step_tokens) * aux).backward()
    assert 1.5 < aux.item() < 2 * 8  # top_k 2 at balance, more when unbalanced: here it is
    router_moved = 0.0
    for (name, p_ours), p_ref in zip(ours.named_parameters(), plain.parameters()):
        scale = p_ref.grad.abs().max().item()
        assert (p_ours.grad - p_ref.grad).abs().max().item() <= 1e-5 * scale, name
    plain.zero_grad()
    token_loss(plain(tokens)).backward()  # without the aux term the router gradient differs
    for (name, p_ours), p_plain in zip(ours.named_parameters(), plain.parameters()):
        if name.endswith("router.gate.weight"):
            router_moved = max(router_moved, (p_ours.grad - p_plain.grad).abs().max().item() / p_ours.grad.abs().max().item())
    assert router_moved > 1e-2


def test_shipped_moe_config_selects_the_tiny_moe_flavor():
    cfg = ConfigManager().parse_args(["--job.config_file", str(MOE_CONFIG)])
    assert (cfg.model.name, cfg.model.flavor, cfg.moe.implementation) == ("ext_qwen3", "tiny_moe", "grouped")


def test_expert_counts_on_cpu_equal_histc_of_the_same_indices_as_floats():
    indices = torch.randint(0, 8, (300, 2))
    indices[indices == 5] = 6  # one expert gets nothing
    with _IntegerHistcAsBincount():
        counts = torch.histc(indices.view(-1), bins=8, min=0, max=8)
    assert counts.tolist() == torch.histc(indices.view(-1).float(), bins=8, min=0, max=8).long().tolist()
    assert counts[5] == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_grouped_experts_equal_the_loop_with_empty_and_uneven_groups(dtype, tol):
    torch.manual_seed(0)
    grouped = Experts(dim=32, hidden_dim=24, num_experts=6, use_grouped_mm=True)
    loop = Experts(dim=32, hidden_dim=24, num_experts=6, use_grouped_mm=False)
    with torch.no_grad():
        grouped.init_weights(0.05)
    loop.load_state_dict(grouped.state_dict())
    grouped.to(dtype), loop.to(dtype)
    counts = torch.tensor([5, 0, 13, 1, 0, 9])
    x = torch.randn(int(counts.sum()), 32, dtype=dtype)
    x_g, x_l = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_g, out_l = grouped(x_g, counts), loop(x_l, counts)
    torch.testing.assert_close(out_g, out_l, atol=tol, rtol=tol)
    grad = torch.randn_like(out_l)
    out_g.backward(grad), out_l.backward(grad)
    torch.testing.assert_close(x_g.grad, x_l.grad, atol=tol, rtol=tol)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(grouped, name).grad, getattr(loop, name).grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_moe_model_equals_the_loop_model_in_outputs_and_gradients(dtype, tol):
    args = flavor_args("ext_qwen3", "tiny_moe", max_seq_len=32, n_layers=2)
    loop_args = dataclasses.replace(args, moe_args=dataclasses.replace(args.moe_args, use_grouped_mm=False))
    grouped = build("ext_qwen3", args).to(dtype)
    loop = get_train_spec("ext_qwen3").model_cls(loop_args).to(dtype)
    loop.load_state_dict(grouped.state_dict())
    assert grouped.layers["0"].moe.experts.use_grouped_mm and not loop.layers["0"].moe.experts.use_grouped_mm
    tokens = torch.randint(0, 2048, (4, 32))
    out_g, out_l = grouped(tokens), loop(tokens)
    torch.testing.assert_close(out_g, out_l, atol=tol, rtol=tol)
    out_g.float().square().mean().backward()
    out_l.float().square().mean().backward()
    for (name, p_g), p_l in zip(grouped.named_parameters(), loop.parameters()):
        scale = p_l.grad.float().abs().max().item()
        assert (p_g.grad.float() - p_l.grad.float()).abs().max().item() <= tol * scale, name
    counts = grouped.layers["0"].moe.tokens_per_expert
    assert counts.sum().item() == 4 * 32 * args.moe_args.top_k  # every token reached k experts


# -- HF adapters ----------------------------------------------------------------------

def random_hf_model(spec: str, args):
    """A transformers model of the flavor with every weight random (norms and router included)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config_for(spec, args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(std=0.5)  # routers far from uniform, so top-k is not decided by rounding
            else:
                p.normal_(std=0.05)
    return model


def assert_same_logits(hf_model, ours, vocab: int):
    tokens = torch.randint(0, vocab, (2, 48))
    with torch.no_grad():
        diff = (hf_model(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("spec,flavor", TINY)
def test_hf_model_loaded_through_the_adapter_gives_the_same_logits(tmp_path, spec, flavor):
    args = flavor_args(spec, flavor, max_seq_len=64)
    hf_model = random_hf_model(spec, args)
    hf_model.save_pretrained(tmp_path)
    assert ("lm_head.weight" in read_safetensors(tmp_path)) is not args.enable_weight_tying
    ours = get_train_spec(spec).model_cls(args).eval()
    load_hf_weights(ours, spec, tmp_path)
    assert (ours.output.weight is ours.tok_embeddings.weight) is args.enable_weight_tying
    assert_same_logits(hf_model, ours, args.vocab_size)


@pytest.mark.parametrize("spec,flavor", TINY)
def test_our_weights_exported_through_the_adapter_load_in_transformers(tmp_path, spec, flavor):
    args = flavor_args(spec, flavor, max_seq_len=64)
    ours = build(spec, args, seed=3).eval()
    exported = state_dict_adapter_for(spec)(args, None).to_hf(ours.state_dict())
    assert ("lm_head.weight" in exported) is not args.enable_weight_tying  # a tied head is written once
    save_file({k: v.contiguous() for k, v in exported.items()}, str(tmp_path / "model.safetensors"))
    hf_config_for(spec, args).save_pretrained(tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_same_logits(hf_model, ours, args.vocab_size)


def test_unknown_spec_has_no_hf_mapping():
    with pytest.raises(ConfigError, match=r"\[model\] name = 'gpt2' has no Hugging Face mapping"):
        hf_config_for("gpt2", flavor_args("ext_llama3", "tiny"))


# -- real 2-process FSDP runs -----------------------------------------------------------

def read_dcp(path, keys: list[str]) -> dict[str, torch.Tensor]:
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(meta[k].size) for k in keys}
    dcp.load(tensors, checkpoint_id=str(path))
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize("spec,flavor", [("ext_llama3", "tiny_tied"), ("ext_qwen3", "tiny_moe_tied")])
def test_tied_weights_stay_one_tensor_under_two_process_fsdp(tmp_path, spec, flavor):
    proc = run_train([
        "--job.config_file", str(MOE_CONFIG), "--job.dump_folder", str(tmp_path),
        "--model.name", spec, "--model.flavor", flavor,
        "--training.steps", "4", "--training.seq_len", "128", "--training.local_batch_size", "4",
        "--metrics.log_freq", "1", "--parallelism.data_parallel_shard_degree", "2",
        "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.last_save_in_hf",
        # bias balancing (the aux loss is the default), which last_save_in_hf takes only when told
        *(["--moe.load_balance_coeff", "1e-3", "--moe.allow_routing_drift"] if "moe" in flavor else []),
    ], nproc=2)
    assert "Applied FSDP" in proc.output
    assert ("allow_routing_drift: the MoE routing biases (moe.expert_bias) are not in this Hugging Face "
            "folder" in proc.output) is ("moe" in flavor)
    step2, step4 = tmp_path / "checkpoint" / "step-2", tmp_path / "checkpoint" / "step-4"

    # after two optimizer steps the head is still the embedding (two units would have diverged)
    keys = ["tok_embeddings.weight", "output.weight"]
    bias_keys = [f"layers.{i}.moe.expert_bias" for i in range(4)] if "moe" in flavor else []
    state = read_dcp(step2, keys + bias_keys)
    assert torch.equal(state["tok_embeddings.weight"], state["output.weight"])
    for key in bias_keys:  # load balancing moved the routing biases, kept at mean 0
        assert state[key].abs().max() > 0 and abs(state[key].mean()) < 1e-6, (key, state[key])

    # the last save is an HF folder with the head written once, which transformers loads
    assert "lm_head.weight" not in read_safetensors(step4)
    args = flavor_args(spec, flavor, max_seq_len=128)
    hf_model = AutoModelForCausalLM.from_pretrained(
        step4, config=hf_config_for(spec, args), dtype=torch.float32).eval()
    ours = get_train_spec(spec).model_cls(args).eval()
    load_hf_weights(ours, spec, step4)
    assert_same_logits(hf_model, ours, 2048)
