"""Segment-aware attention and SkyLadder, against independent references."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import ext.job_config  # noqa: F401
from ext.data.skyladder import SkyLadder
from ext.model.masks import dense_mask, segment_mask_mod, varlen_allowed_pairs, varlen_metadata
from ext.data.skyladder import WindowClock, fragment_segments, skyladder_window
from ext.model.llama3 import SegmentLlama3, SegmentLlama3Args

from .conftest import DEBUG_CONFIG, read_summary, run_train

torch.set_default_dtype(torch.float32)


def tiny_model(backend: str = "dense") -> SegmentLlama3:
    args = SegmentLlama3Args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048,
                             multiple_of=32, rope_theta=10000, max_seq_len=256, mask_backend=backend)
    torch.manual_seed(0)
    model = SegmentLlama3(args)
    with torch.no_grad():
        model.init_weights()
    return model.eval()


def segment_ids_of(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def reset_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])


def brute_force_mask(seg: torch.Tensor) -> torch.Tensor:
    """Allowed (q, k) pairs by definition, with Python loops."""
    b, s = seg.shape
    out = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for i in range(b):
        for q in range(s):
            for k in range(q + 1):
                out[i, 0, q, k] = bool(seg[i, q] == seg[i, k])
    return out


# -- (a) a packed row equals each document alone --------------------------------------

@pytest.mark.parametrize("reset", [True, False], ids=["reset-positions", "absolute-positions"])
def test_each_packed_document_gets_the_logits_it_gets_alone(reset):
    model = tiny_model()
    lengths = [7, 19, 1, 33, 12]
    tokens = torch.randint(3, 2048, (sum(lengths),))
    seg = segment_ids_of(lengths)
    positions = reset_positions(lengths)[None] if reset else None
    with torch.no_grad():
        packed = model(tokens[None], positions=positions, segment_ids=seg[None])[0]
        start = 0
        for n in lengths:
            alone = model(tokens[None, start : start + n], segment_ids=torch.zeros(1, n, dtype=torch.long))[0]
            assert (packed[start : start + n] - alone).abs().max().item() < 1e-5
            start += n


def test_a_document_containing_the_eos_id_stays_one_segment():
    model = tiny_model()
    doc = torch.randint(3, 2048, (20,))
    doc[8] = 1  # the tokenizer's EOS id, inside the text
    row = torch.cat([torch.randint(3, 2048, (6,)), doc])
    seg = segment_ids_of([6, 20])
    with torch.no_grad():
        packed = model(row[None], segment_ids=seg[None])[0, 6:]
        alone = model(doc[None], segment_ids=torch.zeros(1, 20, dtype=torch.long))[0]
    assert (packed - alone).abs().max().item() < 1e-5


# -- (b) SkyLadder fragments equal running the fragment alone --------------------------

def test_each_skyladder_fragment_gets_the_logits_it_gets_alone_with_absolute_positions():
    model = tiny_model()
    lengths, window = [30, 45, 21], 16
    tokens = torch.randint(3, 2048, (sum(lengths),))
    seg = torch.from_numpy(fragment_segments(segment_ids_of(lengths).numpy(), window))
    with torch.no_grad():
        packed = model(tokens[None], segment_ids=seg[None])[0]
        starts = [0] + [i for i in range(1, len(seg)) if seg[i] != seg[i - 1]] + [len(seg)]
        for a, b in zip(starts[:-1], starts[1:]):
            assert b - a <= window
            alone = model(tokens[None, a:b], positions=torch.arange(a, b)[None],
                          segment_ids=torch.zeros(1, b - a, dtype=torch.long))[0]
            assert (packed[a:b] - alone).abs().max().item() < 1e-5


def test_fragments_are_the_union_of_document_boundaries_and_the_window_grid():
    seg = segment_ids_of([5, 9, 10]).numpy()  # boundaries at 5 and 14
    frag = fragment_segments(seg, 4)  # grid at 4, 8, 12, 16, 20
    cuts = {i for i in range(1, len(frag)) if frag[i] != frag[i - 1]}
    assert cuts == {4, 5, 8, 12, 14, 16, 20}


# -- (c) flex and varlen allow exactly the dense pairs ---------------------------------

def random_segments(batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.sort(torch.randperm(seq - 1, generator=g)[: 6] + 1).values
        row = torch.zeros(seq, dtype=torch.long)
        for c in cuts:
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows)


def test_dense_mask_matches_the_definition():
    seg = random_segments(2, 40, 0)
    assert torch.equal(dense_mask(seg), brute_force_mask(seg))


def test_flex_mask_mod_allows_exactly_the_dense_pairs():
    seg = random_segments(3, 200, 1)
    b, s = seg.shape
    grid = segment_mask_mod(seg)(
        torch.arange(b)[:, None, None], torch.zeros(1, dtype=torch.long),
        torch.arange(s)[None, :, None], torch.arange(s)[None, None, :],
    )
    assert torch.equal(grid[:, None], dense_mask(seg))


def test_flex_block_mask_keeps_exactly_the_blocks_with_allowed_pairs():
    seg = random_segments(2, 256, 2)
    block = 32
    bm = create_block_mask(segment_mask_mod(seg), 2, None, 256, 256, device="cpu", BLOCK_SIZE=block, _compile=False)
    blocks_used = bm.to_dense().bool()  # [B, 1, S/block, S/block]
    dense = dense_mask(seg)
    expected = dense.view(2, 1, 256 // block, block, 256 // block, block).any(dim=5).any(dim=3)
    assert torch.equal(blocks_used, expected)


def test_varlen_cu_seqlens_allow_exactly_the_dense_pairs():
    seg = random_segments(4, 64, 3)
    meta = varlen_metadata(seg)
    assert torch.equal(varlen_allowed_pairs(meta, 4, 64), dense_mask(seg))
    assert meta.max_seqlen == max(
        int(torch.unique_consecutive(row, return_counts=True)[1].max()) for row in seg
    )


# -- the flex and varlen models themselves ----------------------------------------------

NEEDS_COMPILER = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="inductor's CPU code needs a C++ compiler")


def segment_model(backend: str) -> SegmentLlama3:
    """tiny_model's weights, with the attention type the config sets for ``backend``."""
    args = SegmentLlama3Args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=32,
                             rope_theta=10000, max_seq_len=256, mask_backend=backend, attn_type=backend,
                             attn_mask_type="block_causal")
    model = SegmentLlama3(args)
    model.load_state_dict(tiny_model().state_dict())
    return model.eval()


@NEEDS_COMPILER
def test_flex_model_forward_on_cpu_equals_the_dense_reference():
    """The real flex kernel (inductor's CPU build; CPU has no flex backward) behind
    torchtitan's FlexAttentionWrapper, with our BlockMask, grouped-query heads."""
    lengths = [50, 30, 100, 76]
    seg = segment_ids_of(lengths)[None].repeat(2, 1)
    tokens = torch.randint(0, 2048, (2, 256), generator=torch.Generator().manual_seed(0))
    flex = segment_model("flex")
    with torch.no_grad():
        masks = flex.get_attention_masks({"input": tokens}, None, {"segment_ids": seg})
        got = flex(tokens, attention_masks=masks, segment_ids=seg)
        want = tiny_model()(tokens, segment_ids=seg)
    assert (got - want).abs().max() < 1e-4


def test_varlen_model_runs_grouped_query_attention():
    """torch's varlen_attn refuses fewer key/value heads than query heads unless
    told enable_gqa, which torchtitan 0.2.2's wrapper never passes; ours does. The
    kernel is CUDA-only, so this runs the model on the meta device (shapes only)."""
    from torch.nn.attention.varlen import varlen_attn

    from ext.model.segments import GQAVarlenAttention

    seg = segment_ids_of([50, 30, 100, 76])[None].repeat(2, 1)
    with torch.device("meta"):
        model = SegmentLlama3(segment_model("varlen").model_args)
        tokens = torch.zeros(2, 256, dtype=torch.long)
    assert all(isinstance(layer.attention.inner_attention, GQAVarlenAttention) for layer in model.layers.values())
    meta = model.get_attention_masks({"input": tokens}, None, {"segment_ids": seg})
    meta = type(meta)(meta.cu_seq_q.to("meta"), meta.cu_seq_k.to("meta"), meta.max_q, meta.max_k)
    with torch.no_grad():
        assert model(tokens, attention_masks=meta).shape == (2, 256, 2048)
    with torch.device("meta"):
        q, kv = torch.empty(512, 4, 16), torch.empty(512, 2, 16)
    with pytest.raises(ValueError, match="enable_gqa"):  # what torchtitan's wrapper calls
        varlen_attn(q, kv, kv, meta.cu_seq_q, meta.cu_seq_k, meta.max_q, meta.max_k, window_size=(-1, 0))


@NEEDS_COMPILER
def test_torchtitans_block_compile_keeps_the_document_masked_logits_and_gradients():
    """[compile] enable: torchtitan compiles each block (fullgraph); the dense mask
    the model passes its layers must reach the compiled blocks, and no module
    keeps it after the step."""
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama3.infra.parallelize import apply_compile

    seg = segment_ids_of([50, 30, 100, 76])[None].repeat(2, 1)
    tokens = torch.randint(0, 2048, (2, 256), generator=torch.Generator().manual_seed(0))
    eager, compiled = tiny_model().train(), tiny_model().train()
    apply_compile(compiled, Compile(enable=True))
    results = []
    for model in (eager, compiled):
        logits = model(tokens, segment_ids=seg)
        logits.float().logsumexp(-1).mean().backward()
        grads = {n.replace("._orig_mod", ""): p.grad for n, p in model.named_parameters()}
        results.append((logits.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    assert all(getattr(m, "mask", None) is None for m in compiled.modules())
    assert (got - want).abs().max() < 1e-4
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-5, rtol=1e-3), name
    # another batch layout reaches the compiled blocks too (the mask is not baked in)
    seg2 = segment_ids_of([128, 128])[None].repeat(2, 1)
    with torch.no_grad():
        assert (compiled(tokens, segment_ids=seg2) - eager(tokens, segment_ids=seg2)).abs().max() < 1e-4


# -- SkyLadder schedules: closed forms ------------------------------------------------

def test_rate_schedule_grows_one_token_every_rate_steps_then_clamps():
    cfg = SkyLadder(enable=True, schedule="rate", init_window=32, rate=8)
    for t in range(0, 20000, 37):
        assert skyladder_window(cfg, t, 2048, 100000) == min(2048, 32 + t // 8)


@pytest.mark.parametrize("schedule", ["lin", "sin", "exp"])
def test_horizon_schedules_follow_their_closed_forms(schedule):
    L, w0, T = 1024, 32, 500
    cfg = SkyLadder(enable=True, schedule=schedule, init_window=w0, horizon_steps=T)
    closed = {
        "lin": lambda t: w0 + (L - w0) * t / T,
        "sin": lambda t: w0 + (L - w0) * math.sin(math.pi / 2 * t / T),
        "exp": lambda t: w0 * (L / w0) ** (t / T),
    }[schedule]
    for t in range(0, 2 * T):
        expected = L if t >= T else min(L, math.floor(closed(t)))
        assert skyladder_window(cfg, t, L, 10**6) == expected, t


def test_horizon_as_a_fraction_of_training_and_rounding():
    cfg = SkyLadder(enable=True, schedule="lin", init_window=32, horizon_fraction=0.5, rounding=64)
    # horizon = 0.5 * 1000 steps; lin at t=100: 32 + 992*0.2 = 230.4 -> 230 -> rounded down to 192
    assert skyladder_window(cfg, 100, 1024, 1000) == 192
    assert skyladder_window(cfg, 0, 1024, 1000) == 32  # floor(32/64)*64 = 0 -> init_window
    assert skyladder_window(cfg, 500, 1024, 1000) == 1024


def test_window_clock_counts_optimizer_steps_over_workers_and_accumulation():
    clock = WindowClock(SkyLadder(enable=True, rate=1, init_window=10), 100, 1000, local_batch=4, grad_accum=2)
    # worker 1 of 2: its rows 0-3 form global batch 1 (step 0), rows 4-7 global batch 3 (step 1)
    assert [clock.step_of_row(r, 1, 2) for r in (0, 3, 4, 7, 8)] == [0, 0, 1, 1, 2]
    assert clock.window_of_row(8, 1, 2) == 12


# -- (d) a CPU training run with document masking and SkyLadder -----------------------

@pytest.mark.slow
def test_cpu_training_with_document_masking_and_skyladder(tmp_path):
    proc = run_train([
        "--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path),
        "--training.steps", "30", "--metrics.log_freq", "1",
        "--skyladder.enable", "--skyladder.schedule", "lin", "--skyladder.init_window", "16",
        "--skyladder.horizon_steps", "20",
    ])
    assert "data:" in proc.output
    history = read_summary(tmp_path)["history"]
    windows = [h["data/attention_window"] for h in history]
    assert windows[0] == 16 and windows[-1] == 256
    assert windows == sorted(windows)
    assert history[-1]["loss"] < history[0]["loss"] - 1.0


def test_without_document_masking_skyladder_cuts_only_at_the_window_grid(tmp_path):
    from ext.data.config import Data, resolve_sources
    from ext.data.dataset import PackedMixtureDataset
    from ext.data.encoders import TextEncoder
    from tokenizers import Tokenizer

    from .conftest import TOKENIZER

    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"text": "%s"}\n' % ("word " * (3 + i % 11)) for i in range(200)))
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    cfg = Data(datasets=[str(data)], buffer_docs=64)
    for within, expect_doc_cuts in ((True, True), (False, False)):
        clock = WindowClock(SkyLadder(enable=True, init_window=16, rate=10**6), 64, 100, 4, 1, within)
        ds = PackedMixtureDataset(resolve_sources(cfg), cfg, TextEncoder(tok, 0, 1), 2, 64, 0, 1, 0, clock)
        seg = next(iter(ds))[0]["segment_ids"].numpy()
        cuts = {i for i in range(1, 64) if seg[i] != seg[i - 1]}
        assert {16, 32, 48} <= cuts
        assert (cuts != {16, 32, 48}) == expect_doc_cuts


def test_rounding_never_keeps_the_schedule_from_reaching_the_full_window():
    # 3000 is not a multiple of 256: floor rounding alone would stop at 2816
    cfg = SkyLadder(enable=True, schedule="lin", init_window=32, horizon_steps=100, rounding=256)
    windows = [skyladder_window(cfg, t, 3000, 1000) for t in range(0, 120)]
    assert windows[-1] == 3000 and windows[100] == 3000
    assert all(w % 256 == 0 for w in windows[:100] if w != 32), windows[:100]
    assert max(windows[:100]) == 2816  # below the full window the grid still holds
    # rate schedule: the full window is reached once w0 + t // rate >= L
    rate = SkyLadder(enable=True, schedule="rate", init_window=32, rate=1, rounding=256)
    assert skyladder_window(rate, 3000 - 32, 3000, 10**6) == 3000
    assert skyladder_window(rate, 3000 - 33, 3000, 10**6) == 2816


def test_rounding_larger_than_the_full_window_is_refused():
    from ext.data.skyladder import validate_skyladder
    from ext.core.errors import ConfigError

    cfg = SkyLadder(enable=True, init_window=32, rounding=512)
    with pytest.raises(ConfigError, match=r"rounding = 512 exceeds the full window 256"):
        validate_skyladder(cfg, 256, 100)
    assert validate_skyladder(SkyLadder(enable=True, init_window=32, rounding=256), 256, 100) == 256


@pytest.mark.parametrize("backend", ["dense", "flex", "varlen"])
def test_a_batch_without_segment_ids_is_one_causal_document_per_row(backend):
    """Generation, eval harnesses and plain token batches carry no segment ids:
    the masked model then gives plain causal attention (the "none" model's logits)."""
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(1))
    causal = tiny_model("none")
    model = tiny_model("dense") if backend == "dense" else segment_model(backend)
    masks = model.get_attention_masks(tokens, None, {})
    one_doc = torch.zeros(2, 64, dtype=torch.int64)
    if backend == "flex":
        want = flex_block_mask_of(one_doc)
        assert torch.equal(masks.to_dense(), want.to_dense())
        return
    if backend == "varlen":
        assert masks.cu_seq_q.tolist() == [0, 64, 128] and masks.max_q == 64
        return
    with torch.no_grad():
        want = causal(tokens)
        got = model(tokens)
        assert (got - want).abs().max() < 1e-5
        assert (model(tokens, segment_ids=one_doc) - want).abs().max() < 1e-5


def flex_block_mask_of(segment_ids: torch.Tensor):
    from ext.model.masks import flex_block_mask

    return flex_block_mask(segment_ids)


# -- benchmarks/attention.py measures the model and the kernels it claims to ------------

def attention_benchmark():
    import importlib.util

    from .conftest import REPO

    spec = importlib.util.spec_from_file_location("attention_benchmark", REPO / "benchmarks" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_benchmark_model_keeps_rope_complex_and_the_fp32_logits():
    from types import SimpleNamespace

    bench = attention_benchmark()
    cfg = SimpleNamespace(dim=64, layers=2, heads=4, seq_len=64)
    model = bench.build_model("none", cfg, torch.device("cpu"), torch.float32)
    ref_args = SegmentLlama3Args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=64,
                                 max_seq_len=64, mask_backend="none", attn_type="sdpa")
    torch.manual_seed(0)
    reference = SegmentLlama3(ref_args)
    with torch.no_grad():
        reference.init_weights()
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    assert model.freqs_cis.dtype == torch.complex64
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))
    bf16 = bench.build_model("none", cfg, torch.device("cpu"), torch.bfloat16)
    assert bf16.freqs_cis.dtype == torch.complex64
    assert torch.equal(bf16.freqs_cis, reference.freqs_cis)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def emulated_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                         enable_gqa=False):
    """torch's varlen_attn (CUDA only) on CPU from dense SDPA, one span at a time:
    window (-1, -1) attends the whole span (its default), (-1, 0) is causal."""
    assert window_size in ((-1, -1), (-1, 0)) and torch.equal(cu_seq_q, cu_seq_k)
    out = torch.empty_like(q)
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa)
        out[a:b] = o.transpose(0, 1)
    return out


def test_attention_benchmark_varlen_call_is_causal_within_documents():
    bench = attention_benchmark()
    seg = bench.web_like_segments(2, 256)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 16, generator=g) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(seg))
    got = bench.varlen_output(emulated_varlen_attn, q, k, v, seg)
    assert (got - reference).abs().max() < 1e-5
    # the emulator tells the two windows apart: varlen's default window is not causal
    meta = varlen_metadata(seg)
    packed = [t.transpose(1, 2).reshape(512, 4, 16) for t in (q, k, v)]
    default = emulated_varlen_attn(*packed, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen)
    assert (default.view(2, 256, 4, 16).transpose(1, 2) - reference).abs().max() > 0.1
