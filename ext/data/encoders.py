"""Record field value -> token document, for plain text and for chat.

A loader reader builds its encoder from a small picklable spec inside its
worker process (the ``transformers`` tokenizer of the chat encoder is loaded
there, after the fork). ``encode_batch`` returns, per value, an int32 token
array or a :class:`Skip` saying why the record gives no document:
``bad=True`` for a malformed record (subject to ``[data] bad_records``: for
text, a value that is not a string or is empty),
``bad=False`` for a sample refused by policy (too long, nothing to train,
a template that rewrites earlier turns), which is always skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ext.data.chat import ChatEncoder, mark_untrained, normalize_conversation


@dataclass(frozen=True)
class Skip:
    reason: str
    bad: bool


@dataclass(frozen=True)
class TextEncoder:
    """Plain text: tokenizer ids wrapped in BOS/EOS (when given)."""

    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None

    marks_untrained = False

    def build(self) -> "TextEncoder":
        return self

    def encode_batch(self, values: list[Any]) -> list[np.ndarray | Skip]:
        out: list[np.ndarray | Skip] = [Skip("field is not a string", bad=True)] * len(values)
        good = [i for i, v in enumerate(values) if isinstance(v, str)]
        bos = np.array([self.bos_id] if self.bos_id is not None else [], np.int32)
        eos = np.array([self.eos_id] if self.eos_id is not None else [], np.int32)
        for i in good:
            if not values[i]:
                out[i] = Skip("empty text", bad=True)
        good = [i for i in good if values[i]]
        encodings = self.tokenizer.encode_batch([values[i] for i in good], add_special_tokens=False)
        for i, enc in zip(good, encodings):
            out[i] = np.concatenate((bos, np.asarray(enc.ids, np.int32), eos))
        return out


@dataclass(frozen=True)
class ChatEncoderSpec:
    """Conversations rendered with a chat template (see :mod:`ext.data.chat`)."""

    hf_assets_path: str
    template_file: str
    train_roles: tuple[str, ...]
    last_turn_only: bool
    mask_method: str
    max_tokens: int
    overlong: str
    template_kwargs: tuple[tuple[str, Any], ...] = ()  # [sft] template_kwargs as (key, value) pairs
    train_empty_think: bool = False
    dropped_reasoning: str = "train"

    marks_untrained = True

    def build(self) -> "ChatDocEncoder":
        return ChatDocEncoder(load_chat_tokenizer(self.hf_assets_path, self.template_file), self)


def load_chat_tokenizer(hf_assets_path: str, template_file: str = "") -> Any:
    """The ``transformers`` tokenizer of ``hf_assets_path`` with its chat template
    (or the one in ``template_file``); ConfigError when there is none."""
    from transformers import AutoTokenizer

    from ext.core.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(hf_assets_path)
    if template_file:
        with open(template_file) as f:
            tok.chat_template = f.read()
    if not tok.chat_template:
        raise ConfigError(
            f"[sft] the tokenizer in {hf_assets_path!r} has no chat template; set [sft] "
            "template_file to a Jinja chat template"
        )
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"[sft] the tokenizer in {hf_assets_path!r} is not a fast tokenizer (offsets needed)")
    return tok


class ChatDocEncoder:
    marks_untrained = True

    def __init__(self, tokenizer: Any, spec: ChatEncoderSpec):
        self.chat = ChatEncoder(
            tokenizer, spec.train_roles, spec.last_turn_only, spec.mask_method,
            spec.max_tokens, spec.overlong, dict(spec.template_kwargs),
            spec.train_empty_think, spec.dropped_reasoning,
        )

    def encode_batch(self, values: list[Any]) -> list[np.ndarray | Skip]:
        out: list[np.ndarray | Skip] = []
        for value in values:
            conv = normalize_conversation(value)
            if isinstance(conv, str):  # malformed: subject to [data] bad_records
                out.append(Skip(f"not a conversation: {conv}", bad=True))
                continue
            # refused by the template or by policy: always skipped, counted and named
            enc = self.chat.encode(conv.messages, conv.tools)
            out.append(Skip(enc, bad=False) if isinstance(enc, str) else mark_untrained(enc))
        return out
