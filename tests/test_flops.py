"""FLOPs, parameter counts and MFU (ext/training/flops.py) against independent references:
FlopCounterMode over real forward+backward passes, models built on the meta
device, brute-force pair counting, and a real training run."""

from __future__ import annotations

import copy
import io
import json
import math
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import ConfigManager
from torchtitan.config.job_config import ActivationCheckpoint
from torchtitan.protocols.train_spec import _extra_train_specs, get_train_spec

import ext.job_config  # noqa: F401  (registers our specs)
from ext import cli
from ext.data.skyladder import fragment_segments
from ext.data.loader import build_packed_dataloader
from ext.data.stats import BatchStats
from ext.core.errors import ConfigError
from ext.data.counts import AttentionCounts, attention_counts
from ext.training.flops import (
    FlopsMeter, FlopsModel, Peak, Recompute, causal_pairs, device_kind,
    flops_report, fp8_converters_on, model_param_count, peak_from_config, resolve_peak,
    table_peak_tflops, torchtitan_estimate,
)

from .conftest import DEBUG_CONFIG, REPO, TOKENIZER, read_summary, run_train, write_repeated_corpus

torch.set_default_dtype(torch.float32)

EXT_FLAVORS = [
    (name, flavor)
    for name in sorted(n for n in _extra_train_specs if n.startswith("ext_"))
    for flavor in get_train_spec(name).model_args
]
TINY_FLAVORS = [(n, f) for n, f in EXT_FLAVORS if f.startswith(("tiny", "nano"))]
B, S = 1, 32  # MoE: 32 tokens x top-2 / 8 experts = 8 rows per expert, no grouped-GEMM padding


def flavor_args(name: str, flavor: str):
    args = copy.deepcopy(get_train_spec(name).model_args[flavor])
    args.max_seq_len = S
    return args


# -- parameters --------------------------------------------------------------------------

@pytest.mark.parametrize("name,flavor", EXT_FLAVORS, ids=[f"{n}-{f}" for n, f in EXT_FLAVORS])
def test_parameter_count_equals_the_built_model(name, flavor):
    args = flavor_args(name, flavor)
    assert FlopsModel.from_args(args).params.total == model_param_count(get_train_spec(name).model_cls, args)


def test_active_parameters_leave_out_the_experts_a_token_skips():
    args = flavor_args("ext_qwen3", "tiny_moe") if ("ext_qwen3", "tiny_moe") in EXT_FLAVORS else None
    if args is None:
        pytest.skip("no ext_qwen3 tiny_moe flavor")
    p, m = FlopsModel.from_args(args).params, args.moe_args
    per_expert = 3 * args.dim * args.moe_inter_dim
    assert p.total - p.active == args.n_layers * (m.num_experts - m.top_k) * per_expert


def test_real_moe_flavors_have_their_advertised_active_size():
    from torchtitan.models.qwen3 import qwen3_args

    assert FlopsModel.from_args(qwen3_args["30B-A3B"]).params.active / 1e9 == pytest.approx(3.3, abs=0.1)
    assert FlopsModel.from_args(qwen3_args["235B-A22B"]).params.active / 1e9 == pytest.approx(22.2, abs=0.1)


# -- model FLOPs against FlopCounterMode -------------------------------------------------

class EagerAttention(nn.Module):
    """q . k^T, causal mask, softmax, . v as plain matmuls (which FlopCounterMode
    counts; on CPU it counts nothing for scaled_dot_product_attention). It
    multiplies the full S x S square, masked entries included."""

    def forward(self, q, k, v, *, scale=None, enable_gqa=False, is_causal=True):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-2, -1) * (scale or q.shape[-1] ** -0.5)
        n = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return scores.softmax(dim=-1) @ v


def _grouped_mm_flops(a, b, offs=None, *args, out_val=None, **kwargs):
    rows = int(offs[-1])  # rows inside the groups (the grouped GEMM skips the rest)
    if out_val.dim() == 2:
        return 2 * rows * a.shape[-1] * out_val.shape[-1]
    return 2 * rows * out_val.shape[1] * out_val.shape[2]  # weight gradient: [E, K, N]


_grouped_mm_flops._get_raw = True  # FlopCounterMode passes tensors, not shapes


def build(name, flavor, eager=True, grouped=False, ac: ActivationCheckpoint | None = None):
    args = flavor_args(name, flavor)
    if getattr(args, "moe_enabled", False):
        args.moe_args.use_grouped_mm = grouped
        args.moe_args._debug_force_load_balance = grouped  # groups of 32 rows: no padding
    torch.manual_seed(0)
    model = get_train_spec(name).model_cls(args)
    with torch.no_grad():
        model.init_weights()
    if eager:
        for layer in model.layers.values():
            layer.attention.inner_attention = EagerAttention()
    if ac is not None:
        import torchtitan.distributed.activation_checkpoint as tt_ac
        from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list

        tt_ac._layer_sac_count = 0  # torchtitan's global counter picks every N-th block
        tt_ac.apply_ac(model, ac, op_sac_save_list=_op_sac_save_list)
    return model, args


def counted_training_flops(model) -> int:
    tokens = torch.randint(0, 2048, (B, S))
    labels = torch.randint(0, 2048, (B, S))
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops}) as fc:
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("name,flavor", TINY_FLAVORS, ids=[f"{n}-{f}" for n, f in TINY_FLAVORS])
def test_training_flops_equal_flop_counter_over_forward_and_backward(name, flavor):
    # Dense, tied and MoE flavors (the issue asks for 2%; the counts agree exactly).
    model, args = build(name, flavor)
    ours = FlopsModel.from_args(args).model_flops(tokens=B * S, pairs=B * S * S)
    assert counted_training_flops(model) == pytest.approx(ours, rel=1e-9)


def test_tied_head_is_one_parameter_but_still_a_matmul():
    pairs = [("ext_llama3", "tiny"), ("ext_llama3", "tiny_tied")]
    if not all(p in EXT_FLAVORS for p in pairs):
        pytest.skip("no tied llama flavor")
    (untied, tied) = (FlopsModel.from_args(flavor_args(*p)) for p in pairs)
    dim, vocab = untied.shape.dim, untied.shape.vocab_size
    assert untied.params.total - tied.params.total == vocab * dim
    assert untied.model_flops(1, 0) == tied.model_flops(1, 0)  # flop-counter checked above


def test_attention_flops_equal_the_eager_reference():
    # The same model with SDPA (uncounted on CPU) and with eager attention: the
    # difference is the attention products alone, over the S x S square.
    eager, args = build("ext_llama3", "tiny", eager=True)
    sdpa, _ = build("ext_llama3", "tiny", eager=False)
    difference = counted_training_flops(eager) - counted_training_flops(sdpa)
    assert difference == FlopsModel.from_args(args).attention_flops(B * S * S)
    assert difference == 12 * args.n_layers * args.n_heads * (args.dim // args.n_heads) * B * S * S


def test_grouped_gemm_moe_flops_equal_flop_counter():
    if ("ext_qwen3", "tiny_moe") not in EXT_FLAVORS:
        pytest.skip("no ext_qwen3 tiny_moe flavor")
    model, args = build("ext_qwen3", "tiny_moe", eager=False, grouped=True)
    assert counted_training_flops(model) == FlopsModel.from_args(args).model_flops(B * S, 0)


AC_CASES = [
    ("ext_llama3", "tiny", "full", "2", True),
    ("ext_llama3", "tiny", "selective", "3", True),
    ("ext_llama3", "tiny", "selective", "op", False),
    ("ext_qwen3", "tiny_moe", "full", "2", True),
    ("ext_qwen3", "tiny_moe", "selective", "op", False),
]


@pytest.mark.parametrize("name,flavor,mode,option,eager", AC_CASES,
                         ids=[f"{f}-{m}-{o}" for _, f, m, o, _ in AC_CASES])
def test_recomputed_flops_equal_flop_counter_under_torchtitans_checkpointing(
    name, flavor, mode, option, eager
):
    # Per-op SAC keeps attention kernels (on GPU) but would recompute eager matmuls,
    # so that case runs with SDPA and counts matmuls only; MoE experts as grouped GEMMs.
    if (name, flavor) not in EXT_FLAVORS:
        pytest.skip(f"no {name} {flavor}")
    ac = ActivationCheckpoint(mode=mode, selective_ac_option=option)
    model, args = build(name, flavor, eager=eager, grouped=True, ac=ac)
    pairs = B * S * S if eager else 0
    fm = FlopsModel.from_args(args)
    recompute = fm.recompute_flops(B * S, pairs, Recompute.from_config(ac))
    assert recompute > 0
    assert counted_training_flops(model) == pytest.approx(fm.model_flops(B * S, pairs) + recompute, rel=1e-9)


def test_recompute_is_zero_without_checkpointing_and_unknown_with_a_memory_budget():
    fm = FlopsModel.from_args(flavor_args("ext_llama3", "tiny"))
    assert fm.recompute_flops(100, 1000, Recompute("none")) == 0
    assert fm.recompute_flops(100, 1000, Recompute("memory_budget")) is None


# -- attended pairs against brute force --------------------------------------------------

def random_rows(seed: int, batch: int = 3, seq: int = 48):
    """Segment ids, labels (20% -100) and the non-padding mask (a padding tail of
    0-11 tokens, one more segment) of random rows."""
    rng = np.random.default_rng(seed)
    seg = np.cumsum(rng.random((batch, seq)) < 0.15, axis=1)
    labels = rng.integers(0, 100, (batch, seq))
    labels[rng.random((batch, seq)) < 0.2] = -100
    n_valid = seq - rng.integers(0, 12, batch)
    valid = np.arange(seq) < n_valid[:, None]
    seg = np.where(valid, seg, seg.max() + 1)
    labels[~valid] = -100
    return seg, labels, valid


def brute_force_pairs(seg, valid, allowed) -> int:
    """Keys attended by every non-padding query, trained or not."""
    total = 0
    for b in range(seg.shape[0]):
        for q in range(seg.shape[1]):
            if valid[b, q]:
                total += sum(1 for k in range(q + 1) if allowed(b, q, k))
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_document_masked_and_causal_pairs_equal_brute_force(seed):
    seg, labels, valid = random_rows(seed)
    counts = attention_counts(seg, labels, valid)
    assert counts.pairs == brute_force_pairs(seg, valid, lambda b, q, k: seg[b, q] == seg[b, k])
    assert counts.pairs_causal == brute_force_pairs(seg, valid, lambda b, q, k: True)
    assert counts.real_tokens == int(valid.sum())
    assert counts.trained_tokens == int((labels != -100).sum())


@pytest.mark.parametrize("window", [1, 5, 16, 48])
def test_skyladder_windowed_pairs_equal_brute_force(window):
    seg, labels, valid = random_rows(7)
    fragments = fragment_segments(seg, window)
    expected = brute_force_pairs(
        seg, valid, lambda b, q, k: seg[b, q] == seg[b, k] and q // window == k // window
    )
    assert attention_counts(fragments, labels, valid).pairs == expected


def test_sft_prompt_tokens_count_as_computed_work():
    # 12 prompt tokens (labels -100) + 4 answer tokens run forward and backward alike.
    labels = np.array([-100] * 12 + [5, 6, 7, 8])
    counts = attention_counts(np.zeros(16, dtype=np.int64), labels)
    assert counts.real_tokens == 16 and counts.trained_tokens == 4
    assert counts.pairs == counts.pairs_causal == causal_pairs(16)


def test_padding_is_not_counted():
    seg = np.array([0] * 10 + [1] * 6)  # 10 real tokens, then the padding tail
    labels = np.array([1] * 9 + [-100] * 7)
    valid = np.arange(16) < 10
    counts = attention_counts(seg, labels, valid)
    assert counts.real_tokens == 10 and counts.trained_tokens == 9
    assert counts.pairs == counts.pairs_causal == causal_pairs(10)


def test_loader_counts_sft_prompts_and_leaves_out_padding():
    # One row per batch: the loader's statistics of that row against the packer's own
    # padding count (inputs are the first seq_len of seq_len + 1 packed tokens).
    cfg = ConfigManager().parse_args([
        "--job.config_file", str(REPO / "train_configs" / "debug_sft.toml"), "--data.num_workers", "0",
        "--data.buffer_docs", "64", "--training.local_batch_size", "1",
    ])
    loader = build_packed_dataloader(1, 0, HuggingFaceTokenizer(str(TOKENIZER)), cfg)
    padded = 0
    for _, (sample, labels, t) in zip(range(12), loader.batches_with_stats()):
        padded += t.pad_tokens > 1
        assert t.real_tokens == t.row_tokens - max(t.pad_tokens, 1)
        assert t.trained_tokens == int((labels != -100).sum()) < t.real_tokens
        assert t.attn_pairs >= t.real_tokens
    assert padded  # the padding case is exercised


def test_fully_trained_segments_give_len_times_len_plus_one_over_two():
    lengths = [7, 1, 30, 12]
    seg = np.repeat(np.arange(len(lengths)), lengths)
    counts = attention_counts(seg, np.zeros_like(seg))
    assert counts.pairs == sum(causal_pairs(n) for n in lengths)
    assert counts.pairs_causal == causal_pairs(len(seg))


def test_loader_statistics_count_the_batches_it_yields_with_skyladder_fragments(tmp_path):
    cfg = ConfigManager().parse_args([
        "--job.config_file", str(DEBUG_CONFIG), "--data.num_workers", "0", "--data.buffer_docs", "64",
        "--training.local_batch_size", "1", "--skyladder.enable", "--skyladder.init_window", "24",
    ])
    loader = build_packed_dataloader(1, 0, HuggingFaceTokenizer(str(TOKENIZER)), cfg)
    totals, seen = [], []
    for _, (sample, labels, t) in zip(range(40), loader.batches_with_stats()):
        totals.append(t)  # one row per batch: the padding of this row
        real = torch.arange(labels.shape[-1]) < t.row_tokens - t.pad_tokens
        seen.append(attention_counts(sample["segment_ids"], labels, real[None]))
        assert t.max_window == t.window_sum >= 24  # one row: its SkyLadder window
    assert sum(t.pad_tokens for t in totals) > 0
    assert sum(totals, BatchStats()).attention_counts == AttentionCounts(
        *(sum(getattr(c, f) for c in seen) for f in ("real_tokens", "trained_tokens", "pairs", "pairs_causal")))
    pairs, causal = (sum(getattr(t, k) for t in totals) for k in ("attn_pairs", "attn_pairs_causal"))
    assert pairs < causal * 24 / 128  # the window shrinks attention


# -- peak table -------------------------------------------------------------------------

@pytest.mark.parametrize("name,sms,bf16", [
    ("NVIDIA A100-SXM4-80GB", 108, 312), ("NVIDIA A100 80GB PCIe", 108, 312),
    ("NVIDIA H100 80GB HBM3", 132, 989), ("NVIDIA H100 PCIe", 114, 756), ("NVIDIA H100 NVL", 132, 835),
    ("NVIDIA H100", 114, 756), ("NVIDIA H200", 132, 989), ("NVIDIA H200 NVL", 132, 835),
    ("NVIDIA B200", 148, 2250), ("AMD Instinct MI300X", 304, 1307), ("AMD Instinct MI325X", 304, 1307),
    ("AMD Instinct MI355X", 256, 2500),
])
def test_peak_table_by_device_name(name, sms, bf16):
    kind = device_kind(name, sms)
    assert table_peak_tflops(kind, fp8=False) == bf16
    assert table_peak_tflops(kind, fp8=True) == (bf16 if kind == "A100" else 2 * bf16)


@pytest.mark.parametrize("name", ["cpu", "NVIDIA GeForce RTX 4090", "NVIDIA RTX A1000", "NVIDIA H20",
                                  "NVIDIA GB200", "NVIDIA L40S", ""])
def test_unknown_devices_have_no_peak_rather_than_an_a100s(name):
    peak = resolve_peak(0.0, device=(name, None))
    assert peak.tflops is None and peak.source == "unknown"


def test_configured_peak_overrides_detection_and_must_not_be_negative():
    cfg = ConfigManager().parse_args(
        ["--job.config_file", str(DEBUG_CONFIG), "--metrics.peak_tflops", "123.5"]
    )
    assert peak_from_config(cfg).tflops == 123.5
    assert resolve_peak(0.0, device=("NVIDIA H100 80GB HBM3", 132)).tflops == 989
    with pytest.raises(ConfigError, match=r"\[metrics\] peak_tflops = -1.0"):
        resolve_peak(-1.0)


def test_preflight_rejects_a_negative_peak():
    from ext.preflight import check

    cfg = ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG), "--metrics.peak_tflops", "-2"])
    assert "[metrics] peak_tflops = -2.0: must be >= 0 (0 detects the device)" in check(cfg)


def test_float8_and_mx_converters_select_the_fp8_peak():
    assert fp8_converters_on(["quantize.linear.float8"]) and fp8_converters_on(["quantize.grouped_mm.mx"])
    assert not fp8_converters_on([]) and not fp8_converters_on(["something.else"])


# -- the per-log meter -------------------------------------------------------------------

def meter(masked: bool, tflops: float | None) -> FlopsMeter:
    fm = FlopsModel.from_args(flavor_args("ext_llama3", "tiny"))
    return FlopsMeter(fm, Peak("x", tflops, "bf16", "config"), Recompute("full"), masked, seq_len=256,
                      devices_per_batch=2)


def test_meter_counts_non_padding_tokens_and_the_pairs_the_model_runs():
    # 1024 tokens in the window, 1000 not padding, 900 trained
    totals = BatchStats(real_tokens=1000, trained_tokens=900, attn_pairs=50_000, attn_pairs_causal=100_000)
    for masked, pairs in ((True, 5e4), (False, 1e5)):
        m = meter(masked, 100.0)
        out = m.window(1024, totals, seconds=2.0)
        exact = m.model.model_flops(1000, pairs)
        assert out["flops/model_flops_exact"] == exact
        assert out["flops/model_tflops_exact"] == pytest.approx(exact / 4.0 / 1e12)  # 2 s x 2 devices/batch
        assert out["flops/tps_real"] == pytest.approx(1000 / 4.0)
        assert out["flops/tps_trained"] == pytest.approx(900 / 4.0)
        assert out["flops/mfu_exact(%)"] == pytest.approx(100 * out["flops/model_tflops_exact"] / 100.0)
        recompute = m.model.recompute_flops(1000, pairs, Recompute("full"))
        assert out["flops/hardware_tflops"] == pytest.approx((exact + recompute) / 4.0 / 1e12)


def test_meter_reports_mfu_in_the_palm_convention_beside_the_exact_one():
    # tiny: L 4, H 4, d_head 32, 1,311,872 params of which 2048 x 128 embedding; S = 256
    palm_per_token = 6 * (1_311_872 - 2048 * 128) + 12 * 4 * 4 * 32 * 256
    totals = BatchStats(real_tokens=1000, trained_tokens=900, attn_pairs=50_000, attn_pairs_causal=100_000)
    m = meter(True, 100.0)
    out = m.window(1024, totals, seconds=2.0)
    assert out["flops/model_flops_palm"] == palm_per_token * 1000
    assert out["flops/mfu_palm(%)"] == pytest.approx(100 * palm_per_token * 1000 / 4.0 / 1e12 / 100.0)
    assert out["flops/mfu_palm(%)"] > out["flops/mfu_exact(%)"]  # no causal halving, no document mask
    line = m.line(out)
    assert f"mfu_palm {out['flops/mfu_palm(%)']:.2f}%" in line
    assert f"mfu_exact {out['flops/mfu_exact(%)']:.2f}%" in line
    # torchtitan's own tflops/mfu columns (per token it counted, padding included) show the palm figure
    assert m.flops_per_token(1024) * 1024 == pytest.approx(palm_per_token * 1000)
    m.add_last_to_timed()
    s = m.summary(2.0)
    assert s["mfu_palm_pct"] == pytest.approx(out["flops/mfu_palm(%)"])
    assert s["mfu_exact_pct"] == pytest.approx(out["flops/mfu_exact(%)"])


def test_meter_without_loader_statistics_counts_full_causal_rows_and_shows_no_mfu_without_a_peak():
    m = meter(False, None)
    out = m.window(512, None, seconds=1.0)
    assert out["flops/model_flops_exact"] == m.model.model_flops(512, 2 * causal_pairs(256))
    assert "flops/mfu_palm(%)" not in out and "flops/mfu_exact(%)" not in out
    assert "mfu_palm n/a  mfu_exact n/a" in m.line(out)


@pytest.mark.parametrize("name,flavor", EXT_FLAVORS, ids=[f"{n}-{f}" for n, f in EXT_FLAVORS])
def test_palm_flops_per_token_equal_torchtitans_own_and_the_closed_form(name, flavor):
    args = flavor_args(name, flavor)
    fm, seq = FlopsModel.from_args(args), 4096
    _, tt_flops = torchtitan_estimate(get_train_spec(name).model_cls, args, seq)
    assert fm.palm_flops_per_token(seq) == tt_flops
    s = fm.shape
    closed = 6 * (fm.params.active - s.vocab_size * s.dim) + 12 * s.n_layers * s.n_heads * s.head_dim * seq
    assert fm.palm_flops_per_token(seq) == closed


# -- CLI and the README's figures ---------------------------------------------------------

def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["flops", *args])
    return code, out.getvalue()


def test_cli_prints_params_and_flops_per_token_as_json():
    code, out = run_cli("--job.config_file", str(DEBUG_CONFIG), "--json", "--data.buffer_docs", "64")
    assert code == 0
    r = json.loads(out.strip().splitlines()[-1])
    fm = FlopsModel.from_args(flavor_args("ext_llama3", "tiny"))
    assert r["params_total"] == r["params_active"] == 1_311_872 == fm.params.total
    assert r["params_embedding"] == 2048 * 128
    assert r["flops_per_token_causal"] == fm.causal_flops_per_token(256)
    assert r["packed_attention"] == "documents" and r["packed_source"] == "data"
    assert r["flops_per_token_packed"] < r["flops_per_token_causal"]  # documents mask attention
    # torchtitan: 6 (N - embedding) + 6 L H (2 d_head) S per token
    assert r["torchtitan_flops_per_token"] == 6 * (1_311_872 - 2048 * 128) + 12 * 4 * 4 * 32 * 256
    assert r["flops_per_token_palm"] == r["torchtitan_flops_per_token"]
    assert r["mfu_palm_over_mfu_exact_causal"] == r["flops_per_token_palm"] / r["flops_per_token_causal"]
    assert r["mfu_palm_over_mfu_exact_packed"] == pytest.approx(
        r["flops_per_token_palm"] / r["flops_per_token_packed"])


def test_cli_table_and_bad_flavor():
    code, out = run_cli("--job.config_file", str(DEBUG_CONFIG), "--packed", "synthetic", "--docs", "500")
    assert code == 0 and "params, total" in out and "FLOPs/token, full causal rows" in out
    assert run_cli("--job.config_file", str(DEBUG_CONFIG), "--model.flavor", "huge")[0] == 2


def test_cli_falls_back_to_synthetic_packing_when_the_configs_data_is_not_here(capsys):
    # The shipped 8B config names a tokenizer and data folders that are not shipped.
    config = str(REPO / "train_configs" / "llama3_8b_multisource.toml")
    assert cli.main(["flops", "--job.config_file", config, "--json", "--docs", "500"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out.strip().splitlines()[-1])
    assert r["packed_source"] == "synthetic" and r["packed_rows"] > 0
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "synthetic" in notes[0] and "Traceback" not in err
    # asked for its data explicitly: one line, exit 2
    assert cli.main(["flops", "--job.config_file", config, "--packed", "data"]) == 2
    err = capsys.readouterr().err
    assert "error: --packed data: [model] hf_assets_path" in err and "Traceback" not in err


@pytest.mark.parametrize("seq_len,masked,over", [
    (8192, False, 0.125), (32768, False, 0.364), (8192, True, 0.252), (32768, True, 1.087),
])
def test_torchtitan_overcount_for_llama3_8b_matches_the_readme(seq_len, masked, over):
    argv = ["--job.config_file", str(REPO / "train_configs" / "llama3_8b_multisource.toml"),
            "--training.seq_len", str(seq_len), "--skyladder.no-enable"]
    if not masked:
        argv.append("--attention.no-document-masking")
    r = flops_report(cli.load_job_config(argv), packed="synthetic", docs=20000)
    key = "torchtitan_overcount_packed" if masked else "torchtitan_overcount_causal"
    assert r[key] == pytest.approx(over, abs=0.001)


# -- a real training run -----------------------------------------------------------------

@pytest.mark.slow
def test_training_run_reports_exact_flops_hardware_flops_and_mfu_na_on_cpu(tmp_path):
    data = tmp_path / "same.jsonl"
    seq_len = write_repeated_corpus(data, n_docs=32)  # every row is one whole document
    proc = run_train([
        "--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path / "out"),
        "--data.datasets", str(data), "--training.seq_len", str(seq_len),
        "--training.local_batch_size", "2", "--training.steps", "2", "--metrics.log_freq", "1",
        "--activation_checkpoint.mode", "full",
    ])
    assert "lspci" not in proc.output and "fallback to A100" not in proc.output
    assert proc.output.count("MFU is shown as n/a") == 1
    assert "flops: tps" in proc.output
    summary = read_summary(tmp_path / "out")
    fm = FlopsModel.from_args(flavor_args("ext_llama3", "tiny"))
    rows = 2
    model = fm.model_flops(rows * seq_len, rows * causal_pairs(seq_len))
    recompute = fm.recompute_flops(rows * seq_len, rows * causal_pairs(seq_len), Recompute("full"))
    for entry in summary["history"]:
        assert entry["flops/model_flops_exact"] == model
        assert entry["flops/model_flops_palm"] == fm.palm_flops_per_token(seq_len) * rows * seq_len
        assert entry["flops/trained_fraction"] == 1.0
        ratio = entry["flops/hardware_tflops"] / entry["flops/model_tflops_exact"]
        assert ratio == pytest.approx(1 + recompute / model)
        assert "flops/mfu_palm(%)" not in entry and "flops/mfu_exact(%)" not in entry
    assert summary["mfu_palm_pct"] is None and summary["mfu_exact_pct"] is None and summary["device"] == "cpu"
    trained, all_tokens = (summary[k] for k in ("trained_tokens_per_second_per_device",
                                                "tokens_per_second_per_device"))
    assert math.isclose(trained, all_tokens)
