"""Chat SFT on real chat data: tool calls, reasoning, and each family's template.

Masks are checked against hand-computed spans, against the prefix-rendering
rule computed with ``transformers``' own ``apply_chat_template`` (one render per
prefix, the slow reference), and against ``transformers``'
``return_assistant_tokens_mask`` where the template has generation tags.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from ext.data.chat import ChatEncoder, normalize_conversation
from ext.data.encoders import ChatDocEncoder, ChatEncoderSpec, Skip

from .chat_templates import TOKENIZER, tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# OpenAI messages format: the tool-call turn has content null and arguments as a JSON string.
TOOL_CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "Sunny, 21 C."},
]
# The same conversation in ShareGPT format (LLaMA-Factory's function_call/observation turns, tools as JSON text).
TOOL_SHAREGPT = {
    "system": "You are helpful.",
    "tools": json.dumps(TOOLS),
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
        {"from": "observation", "value": "{\"temp\": 21}"},
        {"from": "gpt", "value": "Sunny, 21 C."},
    ],
}
REASONING_CHAT = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "reasoning_content": "Add them.", "content": "4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "reasoning_content": "Add again.", "content": "6"},
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Repeat the word apple."},
    {"role": "assistant", "content": "apple"},
    {"role": "user", "content": "Is 7 even or odd?"},
    {"role": "assistant", "content": "7 is odd."},
]
NO_SYSTEM = CHAT[1:]


def trained_runs(tok, enc) -> list[str]:
    """The trained tokens decoded, one string per contiguous run."""
    runs, current = [], []
    for t, m in zip(enc.ids, enc.trained):
        if m:
            current.append(int(t))
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def prefix_reference(tok, messages, tools=None, **kwargs) -> list[str]:
    """The prefix rule, by transformers' apply_chat_template: assistant turn i is
    render(messages[:i+1])[len(render(messages[:i], add_generation_prompt=True)):],
    less trailing whitespace."""
    render = lambda m, gp=False: tok.apply_chat_template(  # noqa: E731
        m, tools=tools, tokenize=False, add_generation_prompt=gp, **kwargs)
    full, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = render(messages[:i], True), render(messages[: i + 1])
            assert full.startswith(start) and full.startswith(end), "reference needs a prefix-stable template"
            spans.append(end[len(start):].rstrip())
    return spans


# -- 1. messages as the templates expect them ------------------------------------------------

def test_openai_tool_call_turn_keeps_tool_calls_name_and_null_content():
    conv = normalize_conversation({"messages": TOOL_CHAT, "tools": TOOLS})
    assert not isinstance(conv, str)
    call = conv.messages[2]
    assert "content" not in call  # null content reaches the template as a missing key, as transformers does
    assert call["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert conv.messages[3]["tool_call_id"] == "call_1" and conv.messages[3]["name"] == "get_weather"
    assert conv.tools == TOOLS


def test_sharegpt_function_call_and_observation_become_tool_call_and_tool_turns():
    a = normalize_conversation(TOOL_SHAREGPT)
    b = normalize_conversation({"messages": TOOL_CHAT, "tools": TOOLS})
    strip = lambda msgs: [{k: v for k, v in m.items() if k not in ("id", "tool_call_id", "name")}  # noqa: E731
                          for m in msgs]
    for m in b.messages:
        for call in m.get("tool_calls", []):
            call.pop("id", None)
    assert strip(a.messages) == strip(b.messages) and a.tools == b.tools


def test_malformed_conversations_name_what_is_wrong():
    assert "role" in normalize_conversation([{"content": "x"}])
    assert "alien" in normalize_conversation([{"from": "alien", "value": "x"}])
    assert "arguments" in normalize_conversation([{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}])


def test_qwen3_tool_call_turn_is_trained_with_its_tool_call_block():
    tok = tokenizer("qwen3")
    enc = ChatEncoder(tok).encode(TOOL_CHAT, tools=TOOLS)
    assert trained_runs(tok, enc) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "Sunny, 21 C.<|im_end|>",
    ]
    assert "get_weather" in tok.decode(enc.ids[: np.argmax(enc.trained)])  # the tools reach the system turn


def test_sharegpt_tool_conversation_trains_what_the_openai_one_does():
    tok = tokenizer("qwen3")
    encoder = ChatEncoder(tok)
    conv = normalize_conversation(TOOL_SHAREGPT)
    a = encoder.encode(conv.messages, tools=conv.tools)
    b = encoder.encode(TOOL_CHAT, tools=TOOLS)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.trained, b.trained)


def test_llama31_tool_call_and_ipython_turns_match_the_prefix_rule():
    tok = tokenizer("llama31")
    enc = ChatEncoder(tok).encode(TOOL_CHAT, tools=TOOLS)
    assert trained_runs(tok, enc) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "Sunny, 21 C.<|eot_id|>"]
    assert trained_runs(tok, enc) == prefix_reference(tok, normalize_conversation(TOOL_CHAT).messages, TOOLS)
    ipython = [dict(m, role="ipython") if m["role"] == "tool" else m for m in TOOL_CHAT]
    assert "<|start_header_id|>ipython<|end_header_id|>" in tok.decode(ChatEncoder(tok).encode(ipython, tools=TOOLS).ids)


def test_template_kwargs_reach_every_render():
    tok = tokenizer("qwen3")
    enc = ChatEncoder(tok, template_kwargs={"enable_thinking": False}).encode(NO_SYSTEM)
    # the non-thinking generation prompt ends in the empty think block: it is the header, never trained
    assert trained_runs(tok, enc) == ["apple<|im_end|>", "7 is odd.<|im_end|>"]
    assert "<think>\n\n</think>" in tok.decode(enc.ids)


def test_doc_encoder_reads_tools_from_the_sample():
    spec = ChatEncoderSpec(str(TOKENIZER), "", ("assistant",), False, "auto", 4096, "drop")
    encoder = ChatDocEncoder(tokenizer("qwen3"), spec)
    [doc] = encoder.encode_batch([{"messages": TOOL_CHAT, "tools": TOOLS}])
    assert not isinstance(doc, Skip)
    assert "get_weather" in tokenizer("qwen3").decode(doc & ((1 << 30) - 1))


# -- 2. one rule for every method ---------------------------------------------------------

@pytest.mark.parametrize("tag", ["{% generation %}", "{%- generation -%}", "{% generation -%}", "{%generation%}"])
def test_generation_tags_are_detected_with_any_whitespace_control(tag):
    tok = tokenizer()
    tok.chat_template = tok.chat_template.replace("{% generation %}", tag)
    encoder = ChatEncoder(tok)
    assert encoder.mask_method == "generation"
    assert trained_runs(tok, encoder.encode(CHAT)) == ["apple<|im_end|>", "7 is odd.<|im_end|>"]


def test_tags_around_the_header_train_what_prefix_rendering_trains():
    tok = tokenizer("smollm3")
    by_tags = ChatEncoder(tok, mask_method="generation").encode(CHAT)
    by_prefix = ChatEncoder(tok, mask_method="prefix").encode(CHAT)
    assert ChatEncoder(tok).mask_method == "generation"
    assert np.array_equal(by_tags.trained, by_prefix.trained)
    assert trained_runs(tok, by_tags) == prefix_reference(tok, CHAT) == ["apple<|im_end|>", "7 is odd.<|im_end|>"]
    # last_turn_only and other settings do not change what a trained turn covers
    last = ChatEncoder(tok, last_turn_only=True).encode(CHAT)
    assert trained_runs(tok, last) == ["7 is odd.<|im_end|>"]


def test_tag_mask_is_transformers_assistant_mask_less_header_and_trailing_newline():
    tok = tokenizer("smollm3")
    ref = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    enc = ChatEncoder(tok).encode(CHAT)
    theirs = np.asarray(ref["assistant_masks"], bool)
    assert np.array_equal(enc.ids, ref["input_ids"])
    assert not (enc.trained & ~theirs).any()
    assert trained_runs(tok, type(enc)(enc.ids, theirs & ~enc.trained)) == ["<|im_start|>assistant\n", "\n"] * 2


def test_shipped_chatml_mask_equals_transformers_assistant_mask():
    tok = tokenizer()
    ref = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    for method in ("generation", "prefix"):
        enc = ChatEncoder(tok, mask_method=method).encode(CHAT)
        assert np.array_equal(enc.trained, np.asarray(ref["assistant_masks"], bool)), method


def test_smollm3_no_think_block_is_header_by_both_methods():
    tok = tokenizer("smollm3")
    kw = {"enable_thinking": False}
    for method in ("generation", "prefix"):
        enc = ChatEncoder(tok, mask_method=method, template_kwargs=kw).encode(CHAT)
        assert trained_runs(tok, enc) == prefix_reference(tok, CHAT, **kw) == ["apple<|im_end|>", "7 is odd.<|im_end|>"]


def test_gemma_turns_match_the_prefix_rule():
    tok = tokenizer("gemma")
    enc = ChatEncoder(tok).encode(NO_SYSTEM)
    assert trained_runs(tok, enc) == prefix_reference(tok, NO_SYSTEM) == ["apple<end_of_turn>", "7 is odd.<end_of_turn>"]


# -- 3. Qwen3 multi-turn -----------------------------------------------------------------

def test_qwen3_multi_turn_trains_every_assistant_turn_by_default():
    tok = tokenizer("qwen3")
    enc = ChatEncoder(tok).encode(CHAT)
    assert trained_runs(tok, enc) == ["apple<|im_end|>", "7 is odd.<|im_end|>"]


def test_qwen3_empty_think_block_is_not_trained_unless_configured():
    tok = tokenizer("qwen3")
    last = ChatEncoder(tok, last_turn_only=True).encode(CHAT)
    assert trained_runs(tok, last) == ["7 is odd.<|im_end|>"]
    trained = ChatEncoder(tok, last_turn_only=True, train_empty_think=True).encode(CHAT)
    assert trained_runs(tok, trained) == ["<think>\n\n</think>\n\n7 is odd.<|im_end|>"]


def test_qwen3_reasoning_is_trained_where_the_template_keeps_it():
    tok = tokenizer("qwen3")
    enc = ChatEncoder(tok).encode(REASONING_CHAT)
    # Qwen3 drops the reasoning of turns before the last user message: that turn trains its answer
    assert trained_runs(tok, enc) == ["4<|im_end|>", "<think>\nAdd again.\n</think>\n\n6<|im_end|>"]
    context_only = ChatEncoder(tok, dropped_reasoning="untrained").encode(REASONING_CHAT)
    assert trained_runs(tok, context_only) == ["<think>\nAdd again.\n</think>\n\n6<|im_end|>"]


def test_qwen3_agentic_turns_after_the_last_query_keep_their_reasoning():
    tok = tokenizer("qwen3")
    chat = [dict(m) for m in TOOL_CHAT]
    chat[2]["reasoning_content"] = "Need the weather."
    enc = ChatEncoder(tok).encode(chat, tools=TOOLS)
    assert trained_runs(tok, enc)[0].startswith("<think>\nNeed the weather.\n</think>\n\n<tool_call>")


# -- 4. skips, not stops ---------------------------------------------------------------------

@pytest.mark.parametrize("family,chat,why", [
    ("gemma", CHAT, "System role not supported"),
    ("mixtral", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}], "roles must alternate"),
])
def test_a_conversation_the_template_rejects_is_skipped_and_counted(family, chat, why):
    tok = tokenizer(family)
    encoder = ChatEncoder(tok)
    reason = encoder.encode(chat)
    assert isinstance(reason, str) and why in reason and encoder.refused[reason] == 1
    assert not isinstance(encoder.encode(NO_SYSTEM), str)  # the next sample is fine


def test_doc_encoder_skips_a_rejected_conversation_and_encodes_the_rest():
    spec = ChatEncoderSpec(str(TOKENIZER), "", ("assistant",), False, "auto", 4096, "drop")
    encoder = ChatDocEncoder(tokenizer("gemma"), spec)
    out = encoder.encode_batch([CHAT, NO_SYSTEM, [{"role": "user", "content": "hi"}], "text"])
    assert isinstance(out[0], Skip) and not out[0].bad and "System role not supported" in out[0].reason
    assert isinstance(out[1], np.ndarray)
    assert out[2] == Skip("no trained token", bad=False)
    assert isinstance(out[3], Skip) and out[3].bad


def test_truncate_cuts_after_the_last_complete_trained_turn():
    tok = tokenizer()
    full = ChatEncoder(tok).encode(CHAT)
    encoder = ChatEncoder(tok, max_tokens=len(full.ids) - 2, overlong="truncate")
    cut = encoder.encode(CHAT)
    assert trained_runs(tok, cut) == ["apple<|im_end|>"]
    assert tok.decode(cut.ids[-1:]) == "<|im_end|>" and encoder.truncated == 1
    tiny = ChatEncoder(tok, max_tokens=8, overlong="truncate")
    assert tiny.encode(CHAT) == "longer than seq_len (no complete trained turn fits)"


# -- 5. linear time ---------------------------------------------------------------------------

def test_masks_come_from_a_constant_number_of_renders():
    tok = tokenizer("qwen3")
    long_chat = [m for k in range(64) for m in (
        {"role": "user", "content": f"Question {k}?"}, {"role": "assistant", "content": f"Answer {k}."})]
    encoder = ChatEncoder(tok)
    enc = encoder.encode(long_chat)
    assert len(trained_runs(tok, enc)) == 64
    assert encoder.renders <= 3  # one full render, two short ones for the generation prompt
    start = time.perf_counter()
    for _ in range(5):
        encoder.encode(long_chat)
    assert (time.perf_counter() - start) / 5 < 0.1  # loose bound on a shared CPU; the benchmark measures it


def test_loader_skips_counts_and_names_a_rejected_conversation_even_with_bad_records_error(tmp_path, caplog):
    import logging

    from ext.data.config import Data, resolve_sources
    from ext.data.dataset import PackedMixtureDataset

    from .chat_templates import GEMMA

    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA)
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in (NO_SYSTEM, CHAT, NO_SYSTEM)))
    spec = ChatEncoderSpec(str(TOKENIZER), str(template), ("assistant",), False, "auto", 4096, "drop")
    cfg = Data(datasets=[str(f)], text_fields=["messages"], on_exhaustion=["drop"], bad_records="error")
    ds = PackedMixtureDataset(resolve_sources(cfg), cfg, spec, 0, 256, 0, 1, 0)
    with caplog.at_level(logging.WARNING):
        rows = list(ds)
    assert rows
    [source] = ds._sources
    assert sum(source.refused.values()) == 1
    assert "System role not supported" in next(iter(source.refused))
    assert f"{f}:2: the chat template rejects it" in caplog.text


def test_sft_template_kwargs_parse_from_toml_and_reach_the_encoder(tmp_path):
    from torchtitan.config import ConfigManager

    import ext.job_config  # noqa: F401
    from ext.data.loader import _encoder

    config = tmp_path / "sft.toml"
    config.write_text(f'[job]\ncustom_config_module = "ext.job_config"\n[model]\nhf_assets_path = "{TOKENIZER}"\n'
                      "[sft]\nenable = true\ntemplate_kwargs = {enable_thinking = false}\n"
                      'dropped_reasoning = "untrained"\n')
    job = ConfigManager().parse_args(["--job.config_file", str(config)])
    spec = _encoder(job, None)
    assert dict(spec.template_kwargs) == {"enable_thinking": False} and spec.dropped_reasoning == "untrained"
    assert spec.build().chat.kwargs["enable_thinking"] is False


def test_a_template_whose_turns_markers_cannot_place_falls_back_to_prefix_renders():
    tok = tokenizer()
    # loops over indices, not messages: no turn marker lands, so every prefix is rendered
    tok.chat_template = (
        "{{ bos_token }}{% for i in range(messages|length) %}{% set m = messages[i] %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    encoder = ChatEncoder(tok)
    enc = encoder.encode(CHAT)
    assert encoder.fallbacks == 1
    assert trained_runs(tok, enc) == prefix_reference(tok, CHAT) == ["apple<|im_end|>", "7 is odd.<|im_end|>"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
def test_a_records_top_level_tools_reach_the_template_from_every_format(tmp_path, fmt):
    """OpenAI-format tool data keeps `tools` beside `messages` in each record
    (columnar files: a `tools` column, often JSON text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ext.data.sources import ArrowShard, ParquetShard, PlainLineShard

    chat = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Sunny."}]
    path = tmp_path / f"tools.{fmt}"
    if fmt == "jsonl":
        path.write_text(json.dumps({"messages": chat, "tools": TOOLS}) + "\n" + json.dumps({"messages": chat}) + "\n")
        shard = PlainLineShard(str(path), "messages", True)
    else:
        table = pa.table({"messages": [chat, chat], "tools": [json.dumps(TOOLS), None]})
        if fmt == "parquet":
            pq.write_table(table, path)
            shard = ParquetShard(str(path), "messages", "tools")
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            shard = ArrowShard(str(path), "messages", "tools")
    (start, stop), *_ = shard.segments()
    values = [v for chunk in shard.chunks(start, stop) for v in chunk.values]
    assert isinstance(values[0], dict) and values[0]["tools"] and isinstance(values[1], list)
    spec = ChatEncoderSpec(str(TOKENIZER), "", ("assistant",), False, "auto", 4096, "drop")
    tok = tokenizer("qwen3")
    with_tools, without = ChatDocEncoder(tok, spec).encode_batch(values)
    decode = lambda doc: tok.decode(doc & ((1 << 30) - 1))  # noqa: E731
    assert "get_weather" in decode(with_tools) and "get_weather" not in decode(without)


def test_asking_for_generation_masks_without_tags_is_one_config_error():
    from ext.core.errors import ConfigError

    tok = tokenizer()
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ConfigError, match=r"no \{% generation %\} tags; use \"prefix\" or \"auto\""):
        ChatEncoder(tok, mask_method="generation")
