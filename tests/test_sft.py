"""Chat SFT: assistant masks against hand-computed expectations, policies, and
loss normalization across data-parallel ranks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

import ext.job_config  # noqa: F401
from ext.data.chat import UNTRAINED_BIT, ChatEncoder, mark_untrained, normalize_messages, split_untrained
from ext.data.encoders import load_chat_tokenizer
from ext.core.errors import ConfigError

from .conftest import DEBUG_CONFIG, TOKENIZER, read_summary, run_train
from .test_chat_templates import CHAT, trained_runs

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Rewrites earlier assistant turns, as Qwen3's template does with its reasoning blocks.
REWRITING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def llama3_style():
    tok = chatml()
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def trained_text(tok, enc) -> str:
    """The trained tokens decoded, turn by turn ('|' between non-adjacent runs)."""
    return "|".join(trained_runs(tok, enc))


# -- masks against hand-computed expectations -------------------------------------------

def test_chatml_generation_tags_train_assistant_turns_and_their_end_token():
    tok = chatml()
    enc = ChatEncoder(tok).encode(CHAT)
    assert ChatEncoder(tok).mask_method == "generation"
    assert trained_text(tok, enc) == "apple<|im_end|>|7 is odd.<|im_end|>"


def test_template_without_tags_falls_back_to_prefix_rendering_with_the_same_mask():
    tok = chatml()
    tok.chat_template = (TOKENIZER / "chat_template_no_generation.jinja").read_text()
    encoder = ChatEncoder(tok)
    assert encoder.mask_method == "prefix"
    tagged = ChatEncoder(chatml()).encode(CHAT)
    plain = encoder.encode(CHAT)
    assert np.array_equal(plain.ids, tagged.ids) and np.array_equal(plain.trained, tagged.trained)


def test_llama3_headers_train_the_answer_and_eot_but_not_the_header():
    tok = llama3_style()
    enc = ChatEncoder(tok).encode(CHAT)
    assert trained_text(tok, enc) == "apple<|eot_id|>|7 is odd.<|eot_id|>"


def test_rendered_ids_hold_exactly_one_bos():
    for tok in (chatml(), llama3_style()):
        enc = ChatEncoder(tok).encode(CHAT)
        assert enc.ids[0] == tok.bos_token_id and (enc.ids == tok.bos_token_id).sum() == 1


def test_a_template_that_emits_bos_twice_is_refused():
    tok = chatml()
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    encoder = ChatEncoder(tok, mask_method="prefix")
    assert encoder.encode(CHAT) == "duplicated BOS" and encoder.refused["duplicated BOS"] == 1


def test_tool_and_user_turns_are_trained_only_when_switched_on():
    tok = chatml()
    chat = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Calling."},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]
    default = ChatEncoder(tok).encode(chat)
    assert trained_text(tok, default) == "Calling.<|im_end|>|It is sunny.<|im_end|>"
    with_tool = ChatEncoder(tok, train_roles=("assistant", "tool")).encode(chat)
    assert trained_text(tok, with_tool) == "Calling.<|im_end|>|<|im_start|>tool\nsunny<|im_end|>|It is sunny.<|im_end|>"
    users = ChatEncoder(tok, train_roles=("user",)).encode(chat)
    # the first token of a sample is never a target, so the first user header loses its first token
    assert trained_text(tok, users).endswith("user\nWeather?<|im_end|>")


def test_last_turn_only_trains_the_final_assistant_turn():
    tok = chatml()
    enc = ChatEncoder(tok, last_turn_only=True).encode(CHAT)
    assert trained_text(tok, enc) == "7 is odd.<|im_end|>"


def test_template_that_rewrites_earlier_turns_trains_each_turn_as_rendered():
    tok = chatml()
    tok.chat_template = REWRITING_TEMPLATE
    encoder = ChatEncoder(tok)
    assert trained_text(tok, encoder.encode(CHAT)) == "(earlier answer)<|im_end|>|7 is odd.<|im_end|>"
    assert not encoder.refused and encoder.fallbacks == 0
    enc = ChatEncoder(tok, last_turn_only=True).encode(CHAT)
    assert trained_text(tok, enc) == "7 is odd.<|im_end|>"


def test_sample_without_trained_tokens_is_dropped_and_counted():
    encoder = ChatEncoder(chatml())
    assert encoder.encode([{"role": "user", "content": "hello?"}]) == "no trained token"
    assert encoder.refused["no trained token"] == 1


def test_overlong_samples_are_dropped_or_truncated():
    tok = chatml()
    n = len(ChatEncoder(tok).encode(CHAT).ids)
    dropper = ChatEncoder(tok, max_tokens=n - 1, overlong="drop")
    assert dropper.encode(CHAT) == "longer than seq_len"
    cut = ChatEncoder(tok, max_tokens=n - 1, overlong="truncate").encode(CHAT)
    assert len(cut.ids) == n - 1


def test_sharegpt_schema_is_read_as_roles():
    conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert normalize_messages(conv) == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a"}]
    assert normalize_messages([{"from": "alien", "value": "x"}]) is None


def test_untrained_marks_survive_packing_as_minus_100_labels():
    tok = chatml()
    enc = ChatEncoder(tok).encode(CHAT)
    row = mark_untrained(enc)
    inputs, labels = split_untrained(row[:-1].astype(np.int64), row[1:].astype(np.int64))
    assert np.array_equal(inputs, enc.ids[:-1])
    assert np.array_equal(labels != -100, enc.trained[1:])
    assert (labels[labels != -100] < UNTRAINED_BIT).all()


def test_missing_chat_template_is_a_config_error(tmp_path):
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((TOKENIZER / name).read_bytes())
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"\[sft\] .* has no chat template; set \[sft\] template_file"):
        load_chat_tokenizer(str(tmp_path))


# -- loss normalization over ranks ----------------------------------------------------------

def same_length_conversations(tok) -> tuple[list[dict], list[dict], int]:
    """Two single-turn chats of equal token length but very different numbers of
    trained tokens: a long answer and a long question."""
    encoder = ChatEncoder(tok)
    a = [{"role": "user", "content": "Hi."},
         {"role": "assistant", "content": "apple river stone cloud garden window candle forest silver"}]
    target = len(encoder.encode(a).ids)
    words = "Please repeat after me the following word".split()
    for k in range(1, 200):
        b = [{"role": "user", "content": " ".join((words * 20)[:k])}, {"role": "assistant", "content": "ok"}]
        n = len(encoder.encode(b).ids)
        if n == target:
            return a, b, target
        if n > target:
            a[1]["content"] += " x"
            target = len(encoder.encode(a).ids)
    raise AssertionError("could not match lengths")


@pytest.mark.slow
def test_two_ranks_give_the_loss_and_grad_norm_of_one_rank_on_the_same_global_batch(tmp_path):
    tok = chatml()
    a, b, length = same_length_conversations(tok)
    encoder = ChatEncoder(tok)
    assert encoder.encode(a).trained.sum() > 3 * encoder.encode(b).trained.sum()
    folder = tmp_path / "chats"
    folder.mkdir()
    for name, conv in (("a", a), ("b", b)):
        (folder / f"{name}.jsonl").write_text((json.dumps({"messages": conv}) + "\n") * 8)
    common = [
        "--job.config_file", str(DEBUG_CONFIG), "--sft.enable", "--data.text_fields", "messages",
        "--data.num_workers", "0", "--data.buffer_docs", "2", "--training.seq_len", str(length - 1),
        "--training.global_batch_size", "2", "--training.steps", "1", "--debug.seed", "3",
    ]
    # one rank: two sources mixed 50/50 give rows [a, b]; two ranks: the folder's two
    # files split by shard give rank 0 the a-rows and rank 1 the b-rows
    run_train([*common, "--job.dump_folder", str(tmp_path / "one"), "--training.local_batch_size", "2",
               "--data.datasets", f"{folder / 'a.jsonl'},{folder / 'b.jsonl'}", "--data.sampling_probs", "0.5", "0.5"])
    run_train([*common, "--job.dump_folder", str(tmp_path / "two"), "--training.local_batch_size", "1",
               "--data.datasets", str(folder), "--parallelism.data_parallel_replicate_degree", "2",
               "--parallelism.data_parallel_shard_degree", "1"], nproc=2)
    one, two = (read_summary(tmp_path / d)["history"][0] for d in ("one", "two"))
    assert math.isclose(one["loss"], two["loss"], rel_tol=1e-5), (one, two)
    assert math.isclose(one["grad_norm"], two["grad_norm"], rel_tol=1e-5), (one, two)
