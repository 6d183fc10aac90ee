"""Chat samples -> token ids and the mask of tokens the loss trains on.

Messages. :func:`normalize_conversation` reads OpenAI ``messages`` or
ShareGPT ``conversations`` and keeps every field a chat template reads
(``tool_calls``, ``reasoning_content``, ``name``, ``tool_call_id``, ...).
``content: null`` becomes a missing key, as ``transformers`` passes it;
tool-call arguments given as JSON text become objects (templates ``tojson``
them); a bare ``{"name", "arguments"}`` call is wrapped as
``{"type": "function", "function": ...}``. ShareGPT ``function_call`` turns
become assistant tool calls, ``observation``/``function``/``tool`` turns tool
results. A sample may be an object holding the turns and its ``tools`` (a
list or JSON text) and, ShareGPT style, a ``system`` prompt.

Rendering. A conversation is rendered once with the chat template, the
sample's tools and ``[sft] template_kwargs``, exactly as
``tokenizer.apply_chat_template`` renders it, and tokenized with
``add_special_tokens=False`` (the template emits BOS; a second BOS is
refused). The template is compiled once with a marker at the start of every
iteration of the loop over the messages and one after that loop, so the
same render tells where each message's turn begins and ends (markers are
removed before tokenizing). Characters map to tokens through the
tokenizer's offsets: a token is trained when it starts inside a trained span.

What is trained (one rule for every method). For a trained assistant turn:
everything the template renders for it after its header, and the
end-of-turn token that closes it (``<|im_end|>``, ``<|eot_id|>``), less the
whitespace after that token. The header is the generation prompt
(``render(messages[:i], add_generation_prompt=True)`` minus
``render(messages[:i])``), or its first line when the turn starts with only
that (Qwen3 with ``enable_thinking = false``: earlier turns have no empty
think block). The span comes from the turn markers (``"prefix"``: on a
template that renders earlier turns unchanged this is exactly the span
between ``render(messages[:i], add_generation_prompt=True)`` and
``render(messages[:i+1])``) or from the template's ``{% generation %}`` tags
(``"generation"``, any whitespace control; a header or newline inside the
tags is trimmed), and the two agree wherever both apply. Other trained roles
(per-role switches) cover their whole turn, header included.

Each turn is trained as the full render shows it: a template that rewrites
earlier turns (Qwen3 drops the reasoning of turns before the last user
message) trains their answer and tool calls; ``dropped_reasoning =
"untrained"`` leaves such turns as context instead. An empty
``<think></think>`` block the template adds to a turn without reasoning
(Qwen3's last turn) is left untrained unless ``train_empty_think``.

A conversation the template rejects (``raise_exception``, a missing field),
with no trained token, or over ``max_tokens`` with ``overlong = "drop"`` is
refused with a reason and counted; ``"truncate"`` cuts after the last
complete trained turn that fits and counts it (``truncated``).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
                  "ipython": "ipython"}

# Packed rows carry "not trained" as this bit on the token id (ids stay < 2**30).
UNTRAINED_BIT = 1 << 30

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
_MARK = re.compile("\ue000(\\d+|e|g|G)\ue001")


@dataclass
class Conversation:
    """Messages in OpenAI format, ready for a chat template, and the sample's tools."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None = None


def _tool_call(call: Any, where: str) -> dict[str, Any] | str:
    if not isinstance(call, dict):
        return f"{where} is not an object"
    call = dict(call)
    if "function" not in call:  # a bare {"name", "arguments"}
        call = {"type": "function", "function": call}
    fn = call["function"]
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return f"{where}.function has no name"
    fn = dict(fn)
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except ValueError:
            return f"{where}.function.arguments is not JSON"
    call["function"] = fn
    return call


def _message(m: Any, i: int) -> dict[str, Any] | str:
    if not isinstance(m, dict):
        return f"turn {i} is not an object"
    if "role" not in m:
        if "from" in m:
            return _sharegpt_message(m, i)
        return f"turn {i} has no role (or from)"
    if not isinstance(m["role"], str):
        return f"turn {i} role is not a string"
    out = {k: v for k, v in m.items() if v is not None}
    content = out.get("content")
    if content is not None and not isinstance(content, (str, list, dict)):
        return f"turn {i} content is a {type(content).__name__}"
    calls = out.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            return f"turn {i} tool_calls is not a list"
        fixed = [_tool_call(c, f"turn {i} tool_calls[{j}]") for j, c in enumerate(calls)]
        for c in fixed:
            if isinstance(c, str):
                return c
        out["tool_calls"] = fixed
    return out


def _sharegpt_message(m: dict[str, Any], i: int) -> dict[str, Any] | str:
    speaker, value = str(m["from"]).lower(), m.get("value")
    if speaker == "function_call":
        try:
            calls = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            return f"turn {i} (function_call) value is not JSON"
        calls = calls if isinstance(calls, list) else [calls]
        fixed = [_tool_call(c, f"turn {i} (function_call)[{j}]") for j, c in enumerate(calls)]
        for c in fixed:
            if isinstance(c, str):
                return c
        return {"role": "assistant", "tool_calls": fixed}
    role = SHAREGPT_ROLES.get(speaker)
    if role is None:
        return f"turn {i} from {m['from']!r} is not a ShareGPT role (human, gpt, system, function_call, observation)"
    if not isinstance(value, str):
        return f"turn {i} value is not a string"
    return {"role": role, "content": value}


def normalize_conversation(value: Any) -> Conversation | str:
    """A sample -> :class:`Conversation`, or a one-line reason why it is not one.

    ``value``: a list of turns (OpenAI ``{"role", "content", ...}`` or ShareGPT
    ``{"from", "value"}``), or an object with ``messages`` or ``conversations``
    and optionally ``tools`` (list or JSON text) and ``system`` (ShareGPT: a
    system prompt put first unless the turns start with one)."""
    tools, system = None, None
    if isinstance(value, dict):
        turns = value.get("messages", value.get("conversations"))
        tools, system = value.get("tools"), value.get("system")
        if isinstance(tools, str):
            try:
                tools = json.loads(tools) if tools.strip() else None
            except ValueError:
                return "tools is not JSON"
        if tools is not None and not isinstance(tools, list):
            return "tools is not a list"
        tools = tools or None
    else:
        turns = value
    if not isinstance(turns, list) or not turns:
        return "not a conversation (a non-empty list of messages/conversations)"
    messages = []
    for i, m in enumerate(turns):
        msg = _message(m, i)
        if isinstance(msg, str):
            return msg
        messages.append(msg)
    if isinstance(system, str) and system and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    return Conversation(messages, tools)


def normalize_messages(value: Any) -> list[dict[str, Any]] | None:
    """The messages of :func:`normalize_conversation`, or None when malformed."""
    conv = normalize_conversation(value)
    return None if isinstance(conv, str) else conv.messages


@dataclass
class Encoded:
    ids: np.ndarray  # int32 [n]
    trained: np.ndarray  # bool [n]: the token is a training target


def _instrument(env: Any, source: str) -> Any:
    """The template compiled with markers: ``ext_turn_mark(item, k)`` at the start of every
    iteration of every loop that outputs text, ``ext_turn_end(k)`` after that loop, and
    constant markers around the output of each ``{% generation %}`` block."""
    from jinja2 import nodes

    tree = env.parse(source)
    count = [0]

    def outputs(node: Any) -> bool:
        return any(True for _ in node.find_all(nodes.Output))

    def visit(node: Any) -> None:
        for child in node.iter_child_nodes():
            visit(child)
        if (isinstance(node, nodes.CallBlock) and isinstance(node.call.node, nodes.ExtensionAttribute)
                and node.call.node.name == "_generation_support"):  # {% generation %}: mark its output
            node.body = [nodes.Output([nodes.TemplateData("\ue000g\ue001")]).set_lineno(node.lineno),
                         *node.body, nodes.Output([nodes.TemplateData("\ue000G\ue001")]).set_lineno(node.lineno)]
        for field in ("body", "else_"):
            body = getattr(node, field, None)
            if not isinstance(body, list):
                continue
            new = []
            for stmt in body:
                new.append(stmt)
                if (isinstance(stmt, nodes.For) and isinstance(stmt.target, nodes.Name)
                        and any(outputs(s) for s in stmt.body)):
                    k, line = count[0], stmt.lineno
                    count[0] += 1
                    mark = nodes.Call(nodes.Name("ext_turn_mark", "load"),
                                      [nodes.Name(stmt.target.name, "load"), nodes.Const(k)], [], None, None)
                    stmt.body.insert(0, nodes.Output([mark]).set_lineno(line))
                    end = nodes.Call(nodes.Name("ext_turn_end", "load"), [nodes.Const(k)], [], None, None)
                    new.append(nodes.Output([end]).set_lineno(line))
            setattr(node, field, new)

    visit(tree)
    return env.from_string(tree)


class _Marks:
    """Per-render state of the turn markers: message object id -> index."""

    def __init__(self, messages: list[dict[str, Any]]):
        self.index = {id(m): i for i, m in enumerate(messages)}
        self.seen: set[int] = set()
        self.loops: set[int] = set()

    def mark(self, item: Any, k: int) -> str:
        i = self.index.get(id(item))
        if i is None or i in self.seen:
            return ""
        self.seen.add(i)
        self.loops.add(k)
        return f"\ue000{i}\ue001"

    def end(self, k: int) -> str:
        return "\ue000e\ue001" if k in self.loops else ""


class ChatEncoder:
    """Renders conversations with a ``transformers`` tokenizer's chat template.

    ``encode(messages, tools)`` returns :class:`Encoded` or a one-line reason
    when the sample is refused; ``refused`` counts the reasons, ``truncated``
    the samples cut by ``overlong = "truncate"``, ``renders`` the template
    renders of the last sample, ``fallbacks`` the samples whose turns the
    markers could not place (masked by rendering prefixes, slower).
    """

    def __init__(
        self,
        tokenizer: Any,
        train_roles: tuple[str, ...] = ("assistant",),
        last_turn_only: bool = False,
        mask_method: str = "auto",
        max_tokens: int | None = None,
        overlong: str = "drop",
        template_kwargs: dict[str, Any] | None = None,
        train_empty_think: bool = False,
        dropped_reasoning: str = "train",
    ):
        from transformers.utils.chat_template_utils import _cached_compile_jinja_template, _plain_template_data

        from ext.core.errors import ConfigError

        self.tok = tokenizer
        self.template = tokenizer.chat_template
        self.train_roles = tuple(train_roles)
        self.last_turn_only = last_turn_only
        self.max_tokens = max_tokens
        self.overlong = overlong
        self.train_empty_think = train_empty_think
        if dropped_reasoning not in ("train", "untrained"):
            raise ConfigError(f"[sft] dropped_reasoning = {dropped_reasoning!r}: use \"train\" or \"untrained\"")
        self.dropped_reasoning = dropped_reasoning
        self.has_tags = GENERATION_TAG.search(self.template) is not None
        if mask_method == "auto":
            mask_method = "generation" if self.has_tags else "prefix"
        if mask_method == "generation" and not self.has_tags:
            raise ConfigError("[sft] mask_method = \"generation\" but the chat template has no "
                              "{% generation %} tags; use \"prefix\" or \"auto\"")
        self.mask_method = mask_method
        self.kwargs = _plain_template_data({**tokenizer.special_tokens_map, **(template_kwargs or {})})
        self._plain = _cached_compile_jinja_template(self.template)
        self._marked = _instrument(self._plain.environment, self.template)
        self.bos_id = tokenizer.bos_token_id
        self.refused: Counter[str] = Counter()
        self.truncated = 0
        self.fallbacks = 0
        self.renders = 0
        self.use_markers = True  # False: always the slow prefix-render path (benchmarks compare both)

    # -- rendering ---------------------------------------------------------------------------

    def _prepare(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> tuple[list, Any]:
        from transformers.utils.chat_template_utils import (
            _alias_reasoning_fields, _normalize_chat_messages, _plain_template_data)

        chat = _alias_reasoning_fields(_plain_template_data(_normalize_chat_messages(messages)))
        return chat, _plain_template_data(tools)

    def _render(self, chat: list, tools: Any, generation_prompt: bool = False) -> str:
        self.renders += 1
        return self._plain.render(messages=chat, tools=tools, documents=None,
                                  add_generation_prompt=generation_prompt, **self.kwargs)

    def _render_marked(self, chat: list, tools: Any) -> tuple[str, dict[int, tuple[int, int]], list]:
        """(text, message index -> (start, end) of its turn, generation-tag spans), one render."""
        self.renders += 1
        marks = _Marks(chat)
        marked = self._marked.render(messages=chat, tools=tools, documents=None, add_generation_prompt=False,
                                     ext_turn_mark=marks.mark, ext_turn_end=marks.end, **self.kwargs)
        pieces: list[str] = []
        starts: list[tuple[int, int]] = []  # (message index, or -1 for a loop end; position in clean text)
        tags: list[tuple[int, int]] = []
        last = shift = 0
        open_tag = None
        for m in _MARK.finditer(marked):
            pieces.append(marked[last:m.start()])
            pos = m.start() - shift
            shift += m.end() - m.start()
            last = m.end()
            kind = m.group(1)
            if kind == "g":
                open_tag = pos if open_tag is None else open_tag
            elif kind == "G":
                if open_tag is not None:
                    tags.append((open_tag, pos))
                open_tag = None
            else:
                starts.append((-1 if kind == "e" else int(kind), pos))
        pieces.append(marked[last:])
        text = "".join(pieces)
        turns: dict[int, tuple[int, int]] = {}
        for (i, pos), (_, nxt) in zip(starts, starts[1:] + [(-1, len(text))]):
            if i >= 0:
                turns[i] = (pos, nxt)
        return text, turns, tags

    def _header(self, chat: list, tools: Any) -> str | None:
        """The generation prompt before the first assistant turn ('' when the template has
        none); None when it cannot be told (the template refuses that prefix)."""
        k = next((i for i, m in enumerate(chat) if m.get("role") == "assistant"), None)
        if k is None:
            return ""
        try:
            bare = self._render(chat[:k], tools)
            prompted = self._render(chat[:k], tools, generation_prompt=True)
        except Exception:  # e.g. a template that needs a first user message
            return None
        return prompted[len(bare):] if prompted.startswith(bare) else None

    # -- spans -------------------------------------------------------------------------------

    def _chosen(self, chat: list, placed: set[int]) -> list[int]:
        turns = [i for i, m in enumerate(chat) if m.get("role") in self.train_roles and i in placed]
        return turns[-1:] if self.last_turn_only else turns

    def _assistant_span(self, text: str, a: int, b: int, header: str, message: dict, exact: bool) -> tuple[int, int] | None:
        """Trim the header, trailing whitespace and an untrained empty think block off [a, b);
        None when a turn from the markers does not contain the header (``exact``)."""
        first_line = header[: header.find("\n") + 1] if "\n" in header else ""
        if header and text.startswith(header, a, b):
            a += len(header)
        elif first_line and text.startswith(first_line, a, b):
            a += len(first_line)
        elif exact and header:
            at = text.find(header, a, b)
            if at < 0:
                return None
            a = at + len(header)
        while b > a and text[b - 1].isspace():
            b -= 1
        if not self.train_empty_think:
            empty = EMPTY_THINK.match(text, a, b)
            if empty:
                a = empty.end()
        reasoning = message.get("reasoning_content")
        if (self.dropped_reasoning == "untrained" and isinstance(reasoning, str) and reasoning.strip()
                and reasoning.strip() not in text[a:b]):
            return (a, a)
        return (a, b)

    def _spans_by_markers(self, chat: list, tools: Any) -> tuple[str, list[tuple[int, int]]] | None:
        text, turns, tags = self._render_marked(chat, tools)
        order = sorted(turns)
        if any(turns[i][0] > turns[j][0] for i, j in zip(order, order[1:])):
            return None
        if any(m.get("role") == "assistant" and i not in turns for i, m in enumerate(chat)):
            return None
        header = self._header(chat, tools) if "assistant" in self.train_roles else ""
        if header is None:  # the slow path renders every prefix (and says why it cannot)
            return None
        spans = []
        for i in self._chosen(chat, set(turns)):
            a, b = turns[i]
            if chat[i]["role"] != "assistant":
                while b > a and text[b - 1].isspace():
                    b -= 1
                spans.append((a, b))
                continue
            if self.mask_method == "generation":
                inside = [(x, y) for x, y in tags if a <= x < b or (x == y == a)]
                if not inside:
                    continue
                span = self._assistant_span(text, inside[0][0], inside[-1][1], header, chat[i], exact=False)
            else:
                span = self._assistant_span(text, a, b, header, chat[i], exact=True)
                if span is None:
                    return None
            spans.append(span)
        return text, spans

    def _spans_by_prefixes(self, chat: list, tools: Any) -> tuple[str, list[tuple[int, int]]] | str:
        """The slow path: render the prefixes of every trained turn (needs a prefix-stable template)."""
        full = self._render(chat, tools)
        spans = []
        for i in self._chosen(chat, set(range(len(chat)))):
            assistant = chat[i]["role"] == "assistant"
            start_text = self._render(chat[:i], tools, generation_prompt=assistant) if (i or assistant) else ""
            end_text = self._render(chat[: i + 1], tools)
            if not (full.startswith(start_text) and full.startswith(end_text)):
                return "template not prefix-stable and its turns could not be located"
            b = len(end_text)
            while b > len(start_text) and end_text[b - 1].isspace():
                b -= 1
            a = len(start_text)
            if assistant and not self.train_empty_think:
                empty = EMPTY_THINK.match(full, a, b)
                a = empty.end() if empty else a
            spans.append((a, b))
        return full, spans

    # -- encode ------------------------------------------------------------------------------

    def encode(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> Encoded | str:
        """Token ids and trained mask of one conversation (OpenAI or ShareGPT turns, read by
        :func:`normalize_conversation`), or the reason it is refused (counted in ``refused``)."""
        self.renders = 0
        conv = normalize_conversation(messages)  # idempotent: already normalized messages pass unchanged
        if isinstance(conv, str):
            return self._refuse(f"not a conversation: {conv}")
        try:
            chat, plain_tools = self._prepare(conv.messages, tools)
            found = self._spans_by_markers(chat, plain_tools) if self.use_markers else None
            if found is None:
                self.fallbacks += 1
                found = self._spans_by_prefixes(chat, plain_tools)
        except Exception as e:  # the template rejects the conversation (raise_exception, missing field, ...)
            msg = " ".join(str(e).split())[:160]
            return self._refuse(f"the chat template rejects it ({type(e).__name__}: {msg})")
        if isinstance(found, str):
            return self._refuse(found)
        text, spans = found
        # the fast tokenizer's backend, as tokenizer(text, add_special_tokens=False) calls it
        enc = self.tok.backend_tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, np.int32)
        starts = np.fromiter((s for s, _ in enc.offsets), dtype=np.int64, count=len(ids))
        trained = np.zeros(len(ids), dtype=bool)
        ends = []  # token index just past each trained span
        for a, b in spans:
            if b > a:
                trained |= (starts >= a) & (starts < b)
                ends.append(int(np.searchsorted(starts, b, side="left")))
        if self.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == self.bos_id:
            return self._refuse("duplicated BOS")
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            if self.overlong == "drop":
                return self._refuse("longer than seq_len")
            fits = [e for e in ends if e <= self.max_tokens and trained[1:e].any()]
            if not fits:
                return self._refuse("longer than seq_len (no complete trained turn fits)")
            cut = max(fits)
            self.truncated += 1
            if self.truncated <= 10 or self.truncated & (self.truncated - 1) == 0:
                logger.warning(f"[sft] truncated a sample of {len(ids)} tokens to {cut} (after its last "
                               f"complete trained turn that fits); truncated so far: {self.truncated}")
            ids, trained = ids[:cut], trained[:cut]
        # the first token of a sample is never a target (nothing precedes it in its segment)
        if not trained[1:].any():
            return self._refuse("no trained token")
        return Encoded(ids, trained)

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
