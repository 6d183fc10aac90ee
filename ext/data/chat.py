"""Chat samples -> token ids and the mask of tokens the loss trains on.

A conversation is rendered with the tokenizer's chat template (or a template
file) and tokenized with ``add_special_tokens=False``: the template already
emits BOS, so a second BOS would be a silent bug (it is checked for).

Which tokens are trained (the *targets*; everything else gets label -100):

- ``"generation"``: the template marks assistant output with
  ``{% generation %}...{% endgeneration %}``; ``transformers`` returns that
  mask (``return_assistant_tokens_mask``). Used for the default
  (assistant turns only, every turn) when the template has the tags.
- ``"prefix"``: the fallback, and what per-role switches and "last turn
  only" use. The conversation is rendered once; turn ``i`` covers the
  characters from ``len(render(messages[:i], add_generation_prompt=True))``
  (assistant turns: after the generation prompt) or
  ``len(render(messages[:i]))`` (other roles) to ``len(render(messages[:i+1]))``,
  with trailing whitespace after the end-of-turn token left out (so ChatML
  gives the same mask both ways). Both prefixes must be string prefixes of the
  full render; a template that rewrites earlier turns (e.g. Qwen3 drops
  earlier reasoning) fails that check and the sample is refused and counted,
  unless only the last turn is trained, which needs just the last prefix.
  Characters map to tokens through the tokenizer's offsets: a token is
  trained when it starts inside a trained span.

The end-of-turn token (``<|im_end|>``, ``<|eot_id|>``) closing each trained
turn is inside the span, so the model learns to stop. A sample whose mask is
empty is dropped and counted, never trained.

Schemas: ``messages`` = [{"role", "content"}] (OpenAI style) or
``conversations`` = [{"from", "value"}] (ShareGPT; human -> user, gpt ->
assistant, system, tool/function -> tool).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}

# Packed rows carry "not trained" as this bit on the token id (ids stay < 2**30).
UNTRAINED_BIT = 1 << 30


def normalize_messages(value: Any) -> list[dict[str, str]] | None:
    """OpenAI ``messages`` or ShareGPT ``conversations`` -> [{"role", "content"}], or None."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None
        if "role" in m and isinstance(m.get("content"), str):
            out.append({"role": str(m["role"]), "content": m["content"]})
        elif "from" in m and isinstance(m.get("value"), str):
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                return None
            out.append({"role": role, "content": m["value"]})
        else:
            return None
    return out


@dataclass
class Encoded:
    ids: np.ndarray  # int32 [n]
    trained: np.ndarray  # bool [n]: the token is a training target


class ChatEncoder:
    """Renders conversations with a ``transformers`` tokenizer's chat template.

    ``encode(messages)`` returns :class:`Encoded` or a short reason string
    when the sample is refused; ``refused`` counts the reasons.
    """

    def __init__(
        self,
        tokenizer: Any,
        train_roles: tuple[str, ...] = ("assistant",),
        last_turn_only: bool = False,
        mask_method: str = "auto",
        max_tokens: int | None = None,
        overlong: str = "drop",
    ):
        self.tok = tokenizer
        self.template = tokenizer.chat_template
        self.train_roles = tuple(train_roles)
        self.last_turn_only = last_turn_only
        self.max_tokens = max_tokens
        self.overlong = overlong
        has_tags = "{% generation %}" in self.template or "{%- generation %}" in self.template
        if mask_method == "auto":
            simple = self.train_roles == ("assistant",) and not last_turn_only
            mask_method = "generation" if has_tags and simple else "prefix"
        self.mask_method = mask_method
        self.bos_id = tokenizer.bos_token_id
        self.refused: Counter[str] = Counter()

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _prefix_mask(self, messages: list[dict[str, str]]) -> Encoded | str:
        full = self._render(messages)
        turns = range(len(messages))
        if self.last_turn_only:
            trained_roles = [i for i in turns if messages[i]["role"] in self.train_roles]
            turns = trained_roles[-1:]
        spans = []
        for i in turns:
            role = messages[i]["role"]
            if role not in self.train_roles:
                continue
            if role == "assistant":  # train after the generation prompt ("<|im_start|>assistant\n")
                start_text = self._render(messages[:i], generation_prompt=True)
            else:
                start_text = self._render(messages[:i]) if i else ""
            end_text = self._render(messages[: i + 1])
            if not (full.startswith(start_text) and full.startswith(end_text)):
                return "template not prefix-stable"
            end = len(end_text)
            while end > len(start_text) and end_text[end - 1].isspace():
                end -= 1
            spans.append((len(start_text), end))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.array([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
        trained = np.zeros(len(starts), dtype=bool)
        for a, b in spans:
            trained |= (starts >= a) & (starts < b)
        return Encoded(np.asarray(enc["input_ids"], np.int32), trained)

    def _generation_mask(self, messages: list[dict[str, str]]) -> Encoded:
        out = self.tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return Encoded(np.asarray(out["input_ids"], np.int32), np.asarray(out["assistant_masks"], bool))

    def encode(self, messages: list[dict[str, str]]) -> Encoded | str:
        enc = self._generation_mask(messages) if self.mask_method == "generation" else self._prefix_mask(messages)
        if isinstance(enc, str):
            return self._refuse(enc)
        if self.bos_id is not None and len(enc.ids) > 1 and enc.ids[0] == enc.ids[1] == self.bos_id:
            return self._refuse("duplicated BOS")
        if self.max_tokens is not None and len(enc.ids) > self.max_tokens:
            if self.overlong == "drop":
                return self._refuse("longer than seq_len")
            enc = Encoded(enc.ids[: self.max_tokens], enc.trained[: self.max_tokens])
        # the first token of a sample is never a target (nothing precedes it in its segment)
        if not enc.trained[1:].any():
            return self._refuse("no trained token")
        return enc

    def _refuse(self, reason: str) -> str:
        self.refused[reason] += 1
        return reason


def mark_untrained(enc: Encoded) -> np.ndarray:
    """Token ids with :data:`UNTRAINED_BIT` set on tokens that are not targets."""
    return np.where(enc.trained, enc.ids, enc.ids | UNTRAINED_BIT).astype(np.int32)


def split_untrained(tokens: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undo :func:`mark_untrained` on packed rows: clean ``tokens``, and ``labels``
    set to -100 wherever the target token was marked (labels are ``tokens[1:]``)."""
    marked = labels >= UNTRAINED_BIT
    labels = np.where(marked, -100, labels)
    return tokens & (UNTRAINED_BIT - 1), labels
