"""Held-out evaluation: the holdout never reaches training, eval batches are
packed and masked as training's, evaluation leaves training untouched, and
data-parallel evaluation gives the one-rank result."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.config import ConfigManager

import ext.job_config  # noqa: F401
from ext.data.config import Data
from ext.data.dataset import PackedMixtureDataset
from ext.data.encoders import TextEncoder
from ext.data.holdout import plan_holdout
from ext.data.loader import build_packed_dataloader
from ext.core.errors import ConfigError
from ext.training.eval import Eval, HeldOutValidator, undisturbed

from .conftest import DEBUG_CONFIG, REPO, TOKENIZER, WEB_CORPUS, read_summary, run_train

TOK = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
BOS, EOS = TOK.token_to_id("<|begin_of_text|>"), TOK.token_to_id("<|end_of_text|>")
SFT_HELDOUT = REPO / "ext" / "assets" / "data" / "sft_heldout.jsonl"


def held_out(text: str, fraction: float) -> bool:
    """The holdout's contract, restated: BLAKE2b-64 of the UTF-8 text / 2**64 < fraction."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64 < fraction


def numbered_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "river stone cloud garden window candle forest silver apple tiger".split()
    return [f"doc{i} " + " ".join(rng.choices(words, k=rng.randint(3, 12))) for i in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def parse(*args: str):
    return ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG), *args])


def doc_ids(rows) -> list[int]:
    """Numbers of the ``docN`` documents whose segments appear in ``rows`` ((sample, labels) pairs)."""
    found = []
    for sample, _ in rows:
        inputs = np.atleast_2d(sample["input"].numpy())
        segs = np.atleast_2d(sample["segment_ids"].numpy())
        for x, s in zip(inputs, segs):
            for seg in np.unique(s):
                text = TOK.decode(x[s == seg].tolist(), skip_special_tokens=True)
                found += [int(m) for m in re.findall(r"doc(\d+)", text)]
    return found


def eval_dataset(spec, dp_rank=0, dp_world=1) -> PackedMixtureDataset:
    return PackedMixtureDataset([spec], Data(datasets=[spec.location], shuffle=False), TextEncoder(TOK, BOS, EOS),
                                2, 64, dp_rank, dp_world, 0)


# -- the holdout ------------------------------------------------------------------------

def test_no_held_out_document_reaches_a_training_batch_and_eval_reads_exactly_them(tmp_path):
    texts = numbered_texts(300)
    corpus = write_jsonl(tmp_path / "docs.jsonl", texts)
    fraction = 0.2
    expected = {i for i, t in enumerate(texts) if held_out(t, fraction)}
    assert 30 < len(expected) < 90
    cfg = parse("--data.datasets", str(corpus), "--data.num_workers", "0", "--data.buffer_docs", "64",
                "--training.seq_len", "64", "--training.local_batch_size", "4",
                "--eval.holdout_fraction", str(fraction))
    tokenizer = build_hf_tokenizer(cfg)
    trained: list[int] = []
    for rank in range(2):  # the training loader itself, two data-parallel ranks, over two epochs
        loader = build_packed_dataloader(dp_world_size=2, dp_rank=rank, tokenizer=tokenizer, job_config=cfg)
        batches = iter(loader)
        for _ in range(2 * 300 // (2 * 4 * 3)):  # >= 2 epochs of this rank's share (>= 3 docs per row)
            trained += doc_ids([next(batches)])
    assert set(trained) == set(range(300)) - expected
    evaluated = []
    for rank in range(2):
        evaluated += doc_ids(eval_dataset(plan_holdout(cfg.data, cfg.eval).heldout[0], rank, 2))
    assert sorted(evaluated) == sorted(expected)  # each held-out document once


def test_holdout_membership_follows_content_not_file_layout(tmp_path):
    texts = numbered_texts(200, seed=1)
    one = write_jsonl(tmp_path / "one.jsonl", texts)
    shuffled = texts[:]
    random.Random(7).shuffle(shuffled)
    folder = tmp_path / "resharded"
    folder.mkdir()
    for k in range(3):
        write_jsonl(folder / f"part{k}.jsonl", shuffled[k::3])
    ids = []
    for location in (one, folder):
        spec = plan_holdout(Data(datasets=[str(location)]), Eval(holdout_fraction=[0.3])).heldout[0]
        ids.append(sorted(doc_ids(eval_dataset(spec))))
    assert ids[0] == ids[1] == sorted(i for i, t in enumerate(texts) if held_out(t, 0.3))


@pytest.mark.timeout(60)
def test_a_source_whose_records_are_all_held_out_ends_training_data_instead_of_looping(tmp_path):
    texts = [t for t in numbered_texts(400) if held_out(t, 0.5)][:3]
    corpus = write_jsonl(tmp_path / "all_held.jsonl", texts)
    spec = plan_holdout(Data(datasets=[str(corpus)]), Eval(holdout_fraction=[0.5])).train[0]
    training = PackedMixtureDataset([spec], Data(datasets=[str(corpus)]), TextEncoder(TOK, BOS, EOS), 2, 64, 0, 1, 0)
    assert list(training) == []


@pytest.mark.parametrize("eval_cfg, message", [
    (Eval(holdout_fraction=[1.0]), r"\[eval\] holdout_fraction\[0\] = 1.0: must be >= 0 and < 1"),
    (Eval(holdout_fraction=[0.1, 0.1, 0.1]), r"\[eval\] holdout_fraction has 3 entries but \[data\] datasets has 2"),
    (Eval(holdout_fraction=[0.1, 0.0], datasets=[str(WEB_CORPUS), ""]), r"has both holdout_fraction 0.1 and a held-out dataset"),
    (Eval(splits=["validation", ""]), r"\[eval\] splits\[0\] = 'validation': .*point \[eval\] datasets\[0\]"),
    (Eval(datasets=["", "/no/such/file.jsonl"]), r"\[eval\] datasets\[1\] '/no/such/file.jsonl' does not exist"),
])
def test_bad_eval_settings_are_one_line_config_errors_naming_the_key(eval_cfg, message):
    data = Data(datasets=[str(WEB_CORPUS), str(WEB_CORPUS)], names=["a", "b"])
    with pytest.raises(ConfigError, match=message):
        plan_holdout(data, eval_cfg)


def test_validation_without_any_held_out_part_is_refused():
    cfg = parse("--validation.enable")
    with pytest.raises(ConfigError, match=r"\[validation\] enable = true but no \[data\] source has a held-out part"):
        HeldOutValidator(job_config=cfg, dp_world_size=1, dp_rank=0, tokenizer=None, parallel_dims=None,
                         loss_fn=None, validation_context=None, maybe_enable_amp=None, metrics_processor=None)


# -- eval batches are training's -----------------------------------------------------------

def test_sft_eval_batches_train_exactly_the_assistant_tokens_of_the_held_out_file():
    cfg = parse("--sft.enable", "--data.datasets", str(REPO / "ext/assets/data/sft_train.jsonl"),
                "--data.text_fields", "messages", "--eval.datasets", str(SFT_HELDOUT),
                "--validation.enable", "--validation.local_batch_size", "4")
    validator = HeldOutValidator(job_config=cfg, dp_world_size=1, dp_rank=0, tokenizer=build_hf_tokenizer(cfg),
                                 parallel_dims=None, loss_fn=None, validation_context=None,
                                 maybe_enable_amp=None, metrics_processor=None)
    ((name, batches),) = validator._build_batches()
    assert name == "sft_train"
    trained = sum(int((labels != -100).sum()) for _, labels in batches)
    # independent count: each assistant answer's tokens plus the <|im_end|> that closes it
    expected = 0
    for line in SFT_HELDOUT.read_text().splitlines():
        for m in json.loads(line)["messages"]:
            if m["role"] == "assistant":
                expected += len(TOK.encode(m["content"], add_special_tokens=False).ids) + 1
    assert trained == expected
    assert all(set(inputs) == {"input", "segment_ids"} and labels.shape == (4, 256) for inputs, labels in batches)


def test_evaluation_context_restores_modes_and_rng_and_takes_no_grad():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    model.train()
    model[2].eval()  # a submodule that was already in eval mode stays so
    torch.manual_seed(3)
    expected_next = torch.rand(3)
    torch.manual_seed(3)
    with undisturbed([model]):
        assert not any(m.training for m in model.modules())
        out = model(torch.ones(2, 4))
        assert not out.requires_grad
        torch.rand(100)  # eval consumed random numbers
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert torch.equal(torch.rand(3), expected_next)


# -- real runs ------------------------------------------------------------------------------

RUN = ["--job.config_file", str(DEBUG_CONFIG), "--model.flavor", "nano", "--training.seq_len", "64",
       "--training.local_batch_size", "4", "--data.num_workers", "0", "--data.buffer_docs", "256",
       "--eval.holdout_fraction", "0.05", "--metrics.log_freq", "1"]


def test_training_losses_are_identical_with_evaluation_on_and_off(tmp_path):
    steps = ["--training.steps", "5"]
    run_train([*RUN, *steps, "--job.dump_folder", str(tmp_path / "off")])
    run_train([*RUN, *steps, "--job.dump_folder", str(tmp_path / "on"), "--metrics.enable_tensorboard",
               "--validation.enable", "--validation.freq", "2", "--validation.steps", "2",
               "--validation.local_batch_size", "4"])
    off, on = read_summary(tmp_path / "off"), read_summary(tmp_path / "on")
    for a, b in zip(off["history"], on["history"], strict=True):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    assert "eval" not in off
    assert [e["step"] for e in on["eval"]] == [1, 2, 4, 5]  # step 1, every freq, the last step
    first = on["eval"][0]
    assert first["eval/web/tokens"] == first["eval/tokens"] > 0
    assert math.isclose(first["eval/perplexity"], math.exp(first["eval/loss"]), rel_tol=1e-9)
    assert on["eval"][-1]["eval/loss"] < first["eval/loss"]  # the model learns
    assert len({e["eval/tokens"] for e in on["eval"]}) == 1  # the same batches every time
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(tmp_path / "on" / "tb" / "*" / "events.*"))
    tags = EventAccumulator(events).Reload().Tags()["scalars"]
    assert {"eval/loss", "eval/perplexity", "eval/web/loss", "eval/web/perplexity"} <= set(tags)


@pytest.mark.slow
def test_two_fsdp_ranks_evaluate_the_whole_holdout_with_the_one_rank_result(tmp_path):
    # a near-zero LR keeps the weights of both runs at the one-rank run's step-1 weights
    common = [*RUN, "--training.steps", "1", "--optimizer.lr", "1e-12", "--validation.enable",
              "--validation.local_batch_size", "16", "--checkpoint.enable"]
    run_train([*common, "--job.dump_folder", str(tmp_path / "one")])
    run_train([*common, "--job.dump_folder", str(tmp_path / "two"), "--checkpoint.initial_load_path",
               str(tmp_path / "one" / "checkpoint" / "step-1")], nproc=2)
    one, two = (read_summary(tmp_path / d)["eval"][0] for d in ("one", "two"))
    # every held-out document once: its tokens minus one label per row-sized piece
    row = 64 + 1
    expected = 0
    for line in WEB_CORPUS.read_text().splitlines():
        text = json.loads(line)["text"]
        if held_out(text, 0.05):
            n = len(TOK.encode(text, add_special_tokens=False).ids) + 2
            expected += n - math.ceil(n / row)
    assert one["eval/tokens"] == two["eval/tokens"] == expected
    assert math.isclose(one["eval/loss"], two["eval/loss"], rel_tol=1e-5), (one, two)


# -- verifiers (optional extra) -------------------------------------------------------------

needs_verifiers = pytest.mark.skipif(importlib.util.find_spec("verifiers") is None,
                                     reason="the optional `verifiers` package is not installed")


def tiny_model(seed: int = 0):
    from ext.model.llama3 import SegmentLlama3, llama3_flavors

    args = llama3_flavors()["nano"]
    args.max_seq_len, args.mask_backend = 256, "dense"
    torch.manual_seed(seed)
    model = SegmentLlama3(args)
    with torch.no_grad():
        model.init_weights()
    return model.eval()


def greedy_reply(model, tok, prompt: str, max_tokens: int) -> str:
    """Reference decoding: the whole sequence again at every token, argmax, stop at <|im_end|>."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    answer = []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(ids, segment_ids=torch.zeros_like(ids))[0, -1].argmax())
            if nxt == tok.convert_tokens_to_ids("<|im_end|>"):
                break
            answer.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(answer, skip_special_tokens=True)


@needs_verifiers
def test_verifiers_environment_scores_the_models_own_greedy_answers(monkeypatch):
    import importlib
    import sys

    from torchtitan.distributed import ParallelDims

    from ext.data.encoders import load_chat_tokenizer
    from ext.training.eval_client import GenerationRequest

    echo = importlib.import_module("tests.verifiers_echo")
    monkeypatch.setitem(sys.modules, "verifiers_echo", echo)  # verifiers ids are top-level module names
    cfg = parse("--validation.enable", "--eval.holdout_fraction", "0.05", "--eval.verifiers_envs", "verifiers_echo",
                "--eval.verifiers_max_tokens", "6")
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    validator = HeldOutValidator(job_config=cfg, dp_world_size=1, dp_rank=0, tokenizer=build_hf_tokenizer(cfg),
                                 parallel_dims=dims, loss_fn=None, validation_context=None, maybe_enable_amp=None,
                                 metrics_processor=None)
    model = tiny_model()
    rewards = validator._verifiers.run([model], step=1)
    tok = load_chat_tokenizer(str(TOKENIZER))
    # verifiers' Trace.last_reply is the reply without surrounding whitespace
    replies = [greedy_reply(model, tok, f"Repeat the word {w}.", 6).strip() for w in echo.WORDS]
    assert rewards == {"verifiers_echo": sum(map(len, replies)) / len(replies)}
    assert any(replies)
    # generation stops at the end-of-turn token: make <|im_end|> the argmax everywhere
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def end_of_turn_first(module, args, logits):
        logits[..., end] = logits.max() + 1.0
        return logits

    model.output.register_forward_hook(end_of_turn_first)
    prompt = validator._verifiers.generator.encode_chat([{"role": "user", "content": "Repeat the word apple."}])
    (done,) = validator._verifiers.generator.generate([model], [GenerationRequest(prompt, 6, 0.0, 1.0)])
    assert (done.text, done.finish_reason) == ("", "stop")
    assert validator._verifiers.run([model], step=2) == {"verifiers_echo": 0.0}
